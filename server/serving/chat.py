"""POST /v1/chat/completions: the tokenizer's chat template, n, logprobs, SSE streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from server.engine.types import TokenLogprob
from server.serving.detokenizer import Track
from server.serving.errors import bad_request
from server.serving.generation import Generation, Served, ServingContext
from server.serving.headers import Hints
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
    Usage,
    new_id,
    now,
)
from server.serving.stream import stream


class ChatServing:
    """POST /v1/chat/completions."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, hints: Hints) -> Served:
        ctx = self.ctx
        if req.n > ctx.max_n:
            raise bad_request(f"n must be at most {ctx.max_n}", "n")
        ids = await ctx.off_loop(self._prompt, req, sum(len(m.text()) for m in req.messages))
        max_tokens = req.requested_max_tokens()
        if max_tokens is None:  # OpenAI: up to the context window
            max_tokens = max(1, ctx.max_model_len - len(ids))
        ctx.check_length(len(ids), max_tokens, "messages")
        choice = ctx.choose(req.model, hints, len(ids), max_tokens)
        rid = new_id("chatcmpl")
        params = req.to_sampling_params(max_tokens)
        gen = ctx.start([ids], params, req.n, choice, hints, req.stop_strings(), rid)
        if req.stream:
            return Served(choice, stream=self._stream(req, rid, [ids], gen), close=gen.finish)
        await gen.run()
        choices = [
            ChatChoice(
                index=t.index,
                message=AssistantMessage(content=t.text),
                logprobs=self._logprobs(t.logprobs) if req.logprobs else None,
                finish_reason=t.finish_reason,
            )
            for t in gen.tracks
        ]
        return Served(
            gen.served_choice(),
            body=ChatCompletionResponse(
                id=rid,
                created=now(),
                model=req.model or ctx.model_name,
                choices=choices,
                usage=gen.usage([ids]),
                soft=gen.soft_info(),
            ),
        )

    def _prompt(self, req: ChatCompletionRequest) -> list[int]:
        tokenizer = self.ctx.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                **(req.chat_template_kwargs or {}),
            )
        except Exception as e:  # jinja raises for roles/orders the template refuses
            raise bad_request(f"the chat template rejected these messages: {e}", "messages") from e
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
        token_str = self.ctx.token_str
        content = []
        for e in entries:
            s = token_str(e.token_id)
            top = [
                TopLogprob(token=(ts := token_str(tid)), logprob=lp, bytes=list(ts.encode()))
                for tid, lp in e.top
            ]
            content.append(
                ChatTokenLogprob(
                    token=s, logprob=e.logprob, bytes=list(s.encode()), top_logprobs=top
                )
            )
        return ChatLogprobs(content=content)

    def _stream(
        self, req: ChatCompletionRequest, rid: str, prompts: list[list[int]], gen: Generation
    ) -> AsyncIterator[str]:
        created, model = now(), req.model or self.ctx.model_name
        sent_lp = {t.index: 0 for t in gen.tracks}

        def response(
            choices: list[ChatChunkChoice], usage: Usage | None = None
        ) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=model, choices=choices,
                                       usage=usage)  # fmt: skip

        def opening() -> list[ChatCompletionChunk]:
            role = DeltaMessage(role="assistant", content="")
            return [response([ChatChunkChoice(index=t.index, delta=role)]) for t in gen.tracks]

        def chunk(t: Track) -> ChatCompletionChunk | None:
            piece = t.releasable()
            lp = None
            if req.logprobs:
                lp = self._logprobs(t.logprobs[sent_lp[t.index] :])
                sent_lp[t.index] = len(t.logprobs)
            if not (piece or t.done or (lp is not None and lp.content)):
                return None
            delta = DeltaMessage(content=piece or None)
            return response([ChatChunkChoice(index=t.index, delta=delta, logprobs=lp,
                                             finish_reason=t.finish_reason)])  # fmt: skip

        def usage() -> ChatCompletionChunk:
            return response([], gen.usage(prompts))

        return stream(gen, opening, chunk, usage if req.include_usage() else None)
