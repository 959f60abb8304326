"""The OpenAI serving object the app holds: the serving context (model, engine, policy,
metrics) with a handler per endpoint composed onto it (vLLM's layout: the router in
server/http/, a handler per endpoint here)."""

from __future__ import annotations

from typing import Any

from server.serving.chat import ChatServing
from server.serving.completion import CompletionServing
from server.serving.generation import ServingContext
from server.serving.models import ModelsServing
from server.serving.soft import SoftServing


class OpenAIServing(ServingContext):
    """The context, plus `completion` (POST /v1/completions), `chat` (POST
    /v1/chat/completions), `models` (GET /v1/models, /v1/models/{id}) and `soft` (GET
    /v1/soft/plan, /v1/soft/stats: the playground's views)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # ServingContext's arguments
        self.completion = CompletionServing(self)
        self.chat = ChatServing(self)
        self.models = ModelsServing(self)
        self.soft = SoftServing(self)
