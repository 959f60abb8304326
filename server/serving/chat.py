"""POST /v1/chat/completions: the tokenizer's chat template, n, logprobs, SSE streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from server.engine.types import TokenLogprob
from server.serving.detokenizer import Track
from server.serving.errors import APIError, bad_request
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
from server.serving.text import MAX_TEMPLATE_CHARS, TemplateTimeout


class ChatServing:
    """POST /v1/chat/completions."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, hints: Hints) -> Served:
        ctx = self.ctx
        ctx.check_fields(req)
        template = req.request_template()
        if template is not None:
            if not ctx.options.trust_request_chat_template:
                raise APIError(
                    400,
                    "this server does not render chat templates sent with a request: start "
                    "it with --trust-request-chat-template (SOFT_TRUST_REQUEST_CHAT_TEMPLATE"
                    "=true) to allow them, or send messages for the model's own template",
                    param="chat_template",
                    code="chat_template_not_allowed",
                )
            if len(template) > MAX_TEMPLATE_CHARS:
                raise bad_request(
                    f"chat_template is over {MAX_TEMPLATE_CHARS} characters", "chat_template"
                )
        grammar = await ctx.grammar(req)
        ids = await ctx.text.run("messages", self._prompt, req, template)
        max_tokens = req.requested_max_tokens()
        learn = None
        if max_tokens is None:  # OpenAI: up to the context window
            max_tokens = max(1, ctx.max_model_len - len(ids))
            learn = "chat"
        ctx.check_length(len(ids), max_tokens, "messages")
        # without max_tokens the policy predicts the output a request like it had
        expected = max_tokens if learn is None else ctx.lengths.expect(learn, max_tokens)
        choice = ctx.choose(req.model, hints, [ids], expected)
        rid = new_id("chatcmpl")
        params = req.to_sampling_params(max_tokens)
        gen = ctx.start(
            [ids], params, req.n, choice, hints, req.stop_strings(), rid, learn, grammar
        )
        if req.stream:
            return Served(choice, stream=self._stream(req, rid, [ids], gen), close=gen.finish)
        await gen.run()
        choices = [
            ChatChoice(
                index=t.index,
                message=AssistantMessage(content=t.text),
                logprobs=self._logprobs(t.logprobs[: t.shown_logprobs()]) if req.logprobs else None,
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

    def _prompt(self, req: ChatCompletionRequest, template: str | None) -> list[int]:
        """The prompt's token ids: the messages through the model's chat template (or the
        request's own, when trusted); runs on a TextPool thread, under its deadline."""
        tokenizer = self.ctx.tokenizer
        if template is None and (
            tokenizer is None or not getattr(tokenizer, "chat_template", None)
        ):
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        kwargs = dict(req.chat_template_kwargs or {})
        kwargs.pop("chat_template", None)
        try:
            text = tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                chat_template=template,
                **kwargs,
            )
        except TemplateTimeout:
            raise
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
            if req.logprobs:  # the tokens of the text released so far
                last = t.shown_logprobs(t.sent)
                lp = self._logprobs(t.logprobs[sent_lp[t.index] : last])
                sent_lp[t.index] = max(last, sent_lp[t.index])
            if not (piece or t.done or (lp is not None and lp.content)):
                return None
            delta = DeltaMessage(content=piece or None)
            return response([ChatChunkChoice(index=t.index, delta=delta, logprobs=lp,
                                             finish_reason=t.finish_reason)])  # fmt: skip

        def usage() -> ChatCompletionChunk:
            return response([], gen.usage(prompts))

        return stream(gen, opening, chunk, usage if req.include_usage() else None)
