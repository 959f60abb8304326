"""The OpenAI serving object the app holds: one context (model, engine, policy, metrics)
and a handler per endpoint, composed (vLLM's layout: router in server/http/, a handler
per endpoint here)."""

from __future__ import annotations

from typing import Any

from server.metrics import Metrics
from server.policy.policies import Policy
from server.serving.chat import ChatServing
from server.serving.completion import CompletionServing
from server.serving.generation import ServingContext
from server.serving.models import ModelsServing


class OpenAIServing:
    """`completion` (POST /v1/completions), `chat` (POST /v1/chat/completions), `models`
    (GET /v1/models, /v1/models/{id}) over one `ServingContext`."""

    def __init__(
        self,
        model: Any,  # SortedModel
        engine: Any,  # server.engine.core.Engine (or a test double with the same interface)
        policy: Policy,
        metrics: Metrics,
        model_name: str,
        max_n: int = 16,
    ) -> None:
        self.ctx = ctx = ServingContext(model, engine, policy, metrics, model_name, max_n)
        self.model, self.engine, self.policy, self.metrics = model, engine, policy, metrics
        self.tokenizer, self.max_model_len = ctx.tokenizer, ctx.max_model_len
        self.completion = CompletionServing(ctx)
        self.chat = ChatServing(ctx)
        self.models = ModelsServing(ctx)
