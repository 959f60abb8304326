"""POST /v1/completions: prompts as text or token ids, n, echo + logprobs (the shape
lm-evaluation-harness reads), SSE streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from server.engine.types import TokenEvent, TokenLogprob
from server.policy.policies import DepthChoice
from server.serving.detokenizer import Track
from server.serving.generation import (
    Hints,
    Served,
    ServingBase,
    bad_request,
    engine_error,
    sse,
)
from server.serving.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    new_id,
    now,
)


class CompletionServing(ServingBase):
    """POST /v1/completions."""

    def _tokenize_prompts(self, req: CompletionRequest) -> list[list[int]]:
        out: list[list[int]] = []
        for p in req.prompts():
            if isinstance(p, str):
                out.append(list(self.tokenizer(p)["input_ids"]) if p else [])
            else:
                if any(t >= self.vocab_size for t in p):
                    raise bad_request(
                        f"prompt token ids must be below the vocabulary size {self.vocab_size}",
                        "prompt",
                    )
                out.append(list(p))
        return out

    async def completions(self, req: CompletionRequest, hints: Hints) -> Served:
        if req.n > self.max_n:
            raise bad_request(f"n must be at most {self.max_n}", "n")
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens must be at least 1 (0 only with echo)", "max_tokens")
        prompts = await self._off_loop(self._tokenize_prompts, req, len(str(req.prompt)))
        if len(prompts) * req.n > self.max_n * 8:
            raise bad_request(
                f"at most {self.max_n * 8} sequences (prompts x n) per request", "prompt"
            )
        max_tokens = max(req.max_tokens, 1)  # echo-only: generate one token, show none
        for ids in prompts:
            self._check_length(len(ids), max_tokens, "prompt")
        choice = self._choose(req.model, hints, max(map(len, prompts)), max_tokens)
        rid = new_id("cmpl")
        tracks, streams = self._submit(
            prompts,
            req.to_sampling_params(max_tokens),
            req.n,
            choice,
            hints,
            req.stop_strings(),
            rid,
        )
        if req.stream:
            return Served(
                choice,
                stream=self._stream_completion(req, rid, prompts, tracks, streams, choice, hints),
                close=lambda: self._close(tracks, choice, hints),
            )
        try:
            async for _ in self._events(tracks, streams):
                pass
        finally:
            self._record(tracks, choice, hints)
        self._raise_engine_error(tracks)
        choices = [self._completion_choice(req, prompts, t, final=True) for t in tracks]
        choice = self._served_at(choice, tracks)
        return Served(
            choice,
            body=CompletionResponse(
                id=rid,
                created=now(),
                model=req.model or self.model_name,
                choices=choices,
                usage=self._usage(prompts, tracks, req.max_tokens > 0),
                soft=self._soft_info(choice),
            ),
        )

    def _echo_text(self, req: CompletionRequest, prompts: list[list[int]], i: int) -> str:
        p = req.prompts()[i]
        return p if isinstance(p, str) else str(self.tokenizer.decode(prompts[i]))

    def _completion_choice(
        self, req: CompletionRequest, prompts: list[list[int]], t: Track, final: bool
    ) -> CompletionChoice:
        show_tokens = req.max_tokens > 0
        text = t.text if show_tokens else ""
        prefix = self._echo_text(req, prompts, t.prompt_index) if req.echo else ""
        lp = None
        if req.logprobs is not None:
            lp = CompletionLogprobs()
            if req.echo:
                self._add_prompt_logprobs(lp, prompts[t.prompt_index], t.prompt_logprobs)
            if show_tokens:
                self._add_logprobs(lp, t.logprobs, len(prefix))
        return CompletionChoice(
            index=t.index,
            text=prefix + text,
            logprobs=lp,
            finish_reason=t.finish_reason if final else None,
        )

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        top = {self._token_str(tid): lp for tid, lp in entry.top}
        top.setdefault(self._token_str(entry.token_id), entry.logprob)
        return top

    def _add_prompt_logprobs(
        self,
        lp: CompletionLogprobs,
        ids: list[int],
        entries: tuple[TokenLogprob | None, ...] | None,
    ) -> None:
        offset = 0
        for k, tid in enumerate(ids):
            s = self._token_str(tid)
            e = entries[k] if entries is not None and k < len(entries) else None
            lp.tokens.append(s)
            lp.token_logprobs.append(None if e is None else e.logprob)
            lp.top_logprobs.append(None if e is None else self._top(e))
            lp.text_offset.append(offset)
            offset += len(s)

    def _add_logprobs(
        self, lp: CompletionLogprobs, entries: Sequence[TokenLogprob], offset: int
    ) -> None:
        for e in entries:
            s = self._token_str(e.token_id)
            lp.tokens.append(s)
            lp.token_logprobs.append(e.logprob)
            lp.top_logprobs.append(self._top(e))
            lp.text_offset.append(offset)
            offset += len(s)

    async def _stream_completion(
        self,
        req: CompletionRequest,
        rid: str,
        prompts: list[list[int]],
        tracks: list[Track],
        streams: dict[str, AsyncIterator[TokenEvent]],
        choice: DepthChoice,
        hints: Hints,
    ) -> AsyncIterator[str]:
        created, model = now(), req.model or self.model_name
        offsets = {t.index: 0 for t in tracks}  # text_offset of the next streamed token
        sent_lp = {t.index: 0 for t in tracks}
        prompt_lp_sent: set[int] = set()

        def chunk(c: CompletionChoice) -> str:
            return sse(CompletionResponse(id=rid, created=created, model=model, choices=[c]))

        try:
            if req.echo:
                for t in tracks:
                    text = self._echo_text(req, prompts, t.prompt_index)
                    offsets[t.index] = len(text)
                    # prompt logprobs arrive with the first event; echo the text right away
                    yield chunk(CompletionChoice(index=t.index, text=text))
            async for t in self._events(tracks, streams):
                piece = t.releasable() if req.max_tokens > 0 else ""
                lp = None
                if req.logprobs is not None:
                    lp = CompletionLogprobs()
                    if req.echo and t.index not in prompt_lp_sent:
                        prompt_lp_sent.add(t.index)
                        self._add_prompt_logprobs(lp, prompts[t.prompt_index], t.prompt_logprobs)
                    new = t.logprobs[sent_lp[t.index] :]
                    if req.max_tokens > 0:
                        self._add_logprobs(lp, new, offsets[t.index])
                        offsets[t.index] += sum(len(self._token_str(e.token_id)) for e in new)
                    sent_lp[t.index] = len(t.logprobs)
                if t.finish_reason == "error":
                    yield sse(engine_error(t).body())
                    continue
                if piece or lp is not None or t.done:
                    yield chunk(
                        CompletionChoice(
                            index=t.index, text=piece, logprobs=lp, finish_reason=t.finish_reason
                        )
                    )
            if req.include_usage():
                yield sse(
                    CompletionResponse(
                        id=rid,
                        created=created,
                        model=model,
                        choices=[],
                        usage=self._usage(prompts, tracks, req.max_tokens > 0),
                    )
                )
            yield "data: [DONE]\n\n"
        finally:
            self._record(tracks, choice, hints)
