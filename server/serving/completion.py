"""POST /v1/completions: prompts as text or token ids, n, echo + logprobs (the shape
lm-evaluation-harness reads), SSE streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.engine.types import TokenLogprob, is_token_id
from server.serving.detokenizer import Track, token_pieces
from server.serving.errors import bad_request
from server.serving.generation import Generation, Served, ServingContext
from server.serving.headers import Hints
from server.serving.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
    now,
)
from server.serving.stream import stream


class CompletionServing:
    """POST /v1/completions."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest, hints: Hints) -> Served:
        ctx = self.ctx
        ctx.check_fields(req)
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens must be at least 1 (0 only with echo)", "max_tokens")
        grammar = await ctx.grammar(req)
        prompts = await ctx.text.run("prompt", self._tokenize_prompts, req)
        if len(prompts) * req.n > ctx.max_n * 8:
            raise bad_request(
                f"at most {ctx.max_n * 8} sequences (prompts x n) per request", "prompt"
            )
        max_tokens = max(req.max_tokens, 1)  # echo-only: generate one token, show none
        for ids in prompts:
            ctx.check_length(len(ids), max_tokens, "prompt")
        choice = ctx.choose(req.model, hints, prompts, max_tokens)
        rid = new_id("cmpl")
        params = req.to_sampling_params(max_tokens)
        gen = ctx.start(
            prompts, params, req.n, choice, hints, req.stop_strings(), rid, grammar=grammar
        )
        if req.stream:
            return Served(choice, stream=self._stream(req, rid, prompts, gen), close=gen.finish)
        await gen.run()
        return Served(
            gen.served_choice(),
            body=CompletionResponse(
                id=rid,
                created=now(),
                model=req.model or ctx.model_name,
                choices=[self._choice(req, prompts, t) for t in gen.tracks],
                usage=gen.usage(prompts, req.max_tokens > 0),
                soft=gen.soft_info(),
            ),
        )

    def _tokenize_prompts(self, req: CompletionRequest) -> list[list[int]]:
        out: list[list[int]] = []
        vocab = self.ctx.vocab_size
        for p in req.prompts():
            if isinstance(p, str):
                out.append(list(self.ctx.tokenizer(p)["input_ids"]) if p else [])
            elif not all(is_token_id(t, vocab) for t in p):
                raise bad_request(
                    f"prompt token ids must be below the vocabulary size {vocab}", "prompt"
                )
            else:
                out.append(list(p))
        return out

    def _echo_text(self, req: CompletionRequest, prompts: list[list[int]], i: int) -> str:
        p = req.prompts()[i]
        return p if isinstance(p, str) else str(self.ctx.tokenizer.decode(prompts[i]))

    def _choice(
        self, req: CompletionRequest, prompts: list[list[int]], t: Track
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
                self._add_logprobs(lp, t, 0, self._shown(t, len(t.text)), len(prefix))
        return CompletionChoice(
            index=t.index, text=prefix + text, logprobs=lp, finish_reason=t.finish_reason
        )

    @staticmethod
    def _shown(t: Track, end: int) -> int:
        """Entries of t.logprobs that go with the text before `end`; at the end, also the
        EOS token that stopped the sequence (after the text, as vLLM and lm-evaluation-
        harness count it: one entry per generated token)."""
        k = t.shown_logprobs(end)
        if t.done and t.stop_token and end >= len(t.text) and k == len(t.logprobs) - 1:
            k += 1
        return k

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        top = {self.ctx.token_str(tid): lp for tid, lp in entry.top}
        top.setdefault(self.ctx.token_str(entry.token_id), entry.logprob)
        return top

    def _add_prompt_logprobs(
        self,
        lp: CompletionLogprobs,
        ids: list[int],
        entries: tuple[TokenLogprob | None, ...] | None,
    ) -> None:
        """The prompt's tokens, as pieces of its text (a multi-byte character is whole in
        the token that completes it), their offsets in characters."""
        offset = 0
        for k, s in enumerate(token_pieces(self.ctx.tokenizer, ids)):
            e = entries[k] if entries is not None and k < len(entries) else None
            lp.tokens.append(s)
            lp.token_logprobs.append(None if e is None else e.logprob)
            lp.top_logprobs.append(None if e is None else self._top(e))
            lp.text_offset.append(offset)
            offset += len(s)

    def _add_logprobs(
        self, lp: CompletionLogprobs, t: Track, first: int, last: int, offset: int
    ) -> None:
        """Append t.logprobs[first:last], each at its place in the text after `offset`
        (the echoed prompt's length)."""
        for k in range(first, last):
            e = t.logprobs[k]
            lp.tokens.append(
                t.piece(k) if k < t.shown_logprobs() else self.ctx.token_str(e.token_id)
            )
            lp.token_logprobs.append(e.logprob)
            lp.top_logprobs.append(self._top(e))
            lp.text_offset.append(offset + min(t.starts[k], len(t.text)))

    def _stream(
        self, req: CompletionRequest, rid: str, prompts: list[list[int]], gen: Generation
    ) -> AsyncIterator[str]:
        created, model = now(), req.model or self.ctx.model_name
        sent_lp = {t.index: 0 for t in gen.tracks}
        echo_sent: set[int] = set()
        shown = req.max_tokens > 0
        # with logprobs, the echo goes out with the prompt's logprobs (the first event's)
        echo_first = req.echo and req.logprobs is None

        def response(
            choices: list[CompletionChoice], usage: Usage | None = None
        ) -> CompletionResponse:
            return CompletionResponse(id=rid, created=created, model=model, choices=choices,
                                      usage=usage)  # fmt: skip

        def opening() -> list[CompletionResponse]:
            if not echo_first:
                return []
            out = []
            for t in gen.tracks:
                echo_sent.add(t.index)
                text = self._echo_text(req, prompts, t.prompt_index)
                out.append(response([CompletionChoice(index=t.index, text=text)]))
            return out

        def chunk(t: Track) -> CompletionResponse | None:
            prefix = ""
            if req.echo:
                prefix = self._echo_text(req, prompts, t.prompt_index)
            echo = prefix if t.index not in echo_sent else ""
            echo_sent.add(t.index)
            piece = t.releasable() if shown else ""
            lp = None
            if req.logprobs is not None:
                lp = CompletionLogprobs()
                if echo:
                    self._add_prompt_logprobs(lp, prompts[t.prompt_index], t.prompt_logprobs)
                if shown:
                    last = self._shown(t, t.sent)
                    self._add_logprobs(lp, t, sent_lp[t.index], last, len(prefix))
                    sent_lp[t.index] = last
                if not lp.tokens:
                    lp = None
            if not (echo or piece or lp is not None or t.done):
                return None
            c = CompletionChoice(index=t.index, text=echo + piece, logprobs=lp,
                                 finish_reason=t.finish_reason)  # fmt: skip
            return response([c])

        def usage() -> CompletionResponse:
            return response([], gen.usage(prompts, shown))

        return stream(gen, opening, chunk, usage if req.include_usage() else None)
