"""POST /v1/chat/completions: the tokenizer's chat template, n, logprobs, SSE streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from server.engine.types import TokenEvent, TokenLogprob
from server.policy.policies import DepthChoice
from server.serving.detokenizer import Track
from server.serving.generation import Hints, Served, ServingBase, bad_request, engine_error, sse
from server.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    new_id,
    now,
)


class ChatServing(ServingBase):
    """POST /v1/chat/completions."""

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                **(req.chat_template_kwargs or {}),
            )
        except Exception as e:  # jinja raises for roles/orders the template refuses
            raise bad_request(f"the chat template rejected these messages: {e}", "messages") from e
        return list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    async def chat(self, req: ChatCompletionRequest, hints: Hints) -> Served:
        if req.n > self.max_n:
            raise bad_request(f"n must be at most {self.max_n}", "n")
        ids = await self._off_loop(self._chat_prompt, req, sum(len(m.text()) for m in req.messages))
        max_tokens = req.requested_max_tokens()
        if max_tokens is None:  # OpenAI: up to the context window
            max_tokens = max(1, self.max_model_len - len(ids))
        self._check_length(len(ids), max_tokens, "messages")
        choice = self._choose(req.model, hints, len(ids), max_tokens)
        rid = new_id("chatcmpl")
        tracks, streams = self._submit(
            [ids], req.to_sampling_params(max_tokens), req.n, choice, hints, req.stop_strings(), rid
        )
        if req.stream:
            return Served(
                choice,
                stream=self._stream_chat(req, rid, [ids], tracks, streams, choice, hints),
                close=lambda: self._close(tracks, choice, hints),
            )
        try:
            async for _ in self._events(tracks, streams):
                pass
        finally:
            self._record(tracks, choice, hints)
        self._raise_engine_error(tracks)
        choices = [
            ChatChoice(
                index=t.index,
                message=AssistantMessage(content=t.text),
                logprobs=self._chat_logprobs(t.logprobs) if req.logprobs else None,
                finish_reason=t.finish_reason,
            )
            for t in tracks
        ]
        choice = self._served_at(choice, tracks)
        return Served(
            choice,
            body=ChatCompletionResponse(
                id=rid,
                created=now(),
                model=req.model or self.model_name,
                choices=choices,
                usage=self._usage([ids], tracks),
                soft=self._soft_info(choice),
            ),
        )

    def _chat_logprobs(self, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
        content = []
        for e in entries:
            s = self._token_str(e.token_id)
            top = [
                TopLogprob(token=(ts := self._token_str(tid)), logprob=lp, bytes=list(ts.encode()))
                for tid, lp in e.top
            ]
            content.append(
                ChatTokenLogprob(
                    token=s, logprob=e.logprob, bytes=list(s.encode()), top_logprobs=top
                )
            )
        return ChatLogprobs(content=content)

    async def _stream_chat(
        self,
        req: ChatCompletionRequest,
        rid: str,
        prompts: list[list[int]],
        tracks: list[Track],
        streams: dict[str, AsyncIterator[TokenEvent]],
        choice: DepthChoice,
        hints: Hints,
    ) -> AsyncIterator[str]:
        created, model = now(), req.model or self.model_name
        sent_lp = {t.index: 0 for t in tracks}

        def chunk(c: ChatChunkChoice) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[c]))

        try:
            for t in tracks:
                yield chunk(
                    ChatChunkChoice(index=t.index, delta=DeltaMessage(role="assistant", content=""))
                )
            async for t in self._events(tracks, streams):
                if t.finish_reason == "error":
                    yield sse(engine_error(t).body())
                    continue
                piece = t.releasable()
                lp = None
                if req.logprobs:
                    lp = self._chat_logprobs(t.logprobs[sent_lp[t.index] :])
                    sent_lp[t.index] = len(t.logprobs)
                if piece or t.done or (lp is not None and lp.content):
                    yield chunk(
                        ChatChunkChoice(
                            index=t.index,
                            delta=DeltaMessage(content=piece or None),
                            logprobs=lp,
                            finish_reason=t.finish_reason,
                        )
                    )
            if req.include_usage():
                yield sse(
                    ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=model,
                        choices=[],
                        usage=self._usage(prompts, tracks),
                    )
                )
            yield "data: [DONE]\n\n"
        finally:
            self._record(tracks, choice, hints)
