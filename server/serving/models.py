"""GET /v1/models and GET /v1/models/{id}: the served model and one card per exit
(`<name>@<depth>`, what a client pins a depth with)."""

from __future__ import annotations

from server.serving.errors import APIError
from server.serving.generation import ServingContext
from server.serving.protocol import ModelCard, ModelList


class ModelsServing:
    """The model cards."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def list(self) -> ModelList:
        ctx = self.ctx
        cards = [
            ModelCard(
                id=ctx.model_name,
                created=ctx.created,
                root=ctx.model.source,
                max_model_len=ctx.max_model_len,
                depth=ctx.policy.default_depth,
            )
        ]
        for d in ctx.model.exits:
            cards.append(
                ModelCard(
                    id=f"{ctx.model_name}@{d}",
                    created=ctx.created,
                    parent=ctx.model_name,
                    max_model_len=ctx.max_model_len,
                    depth=d,
                )
            )
        return ModelList(data=cards)

    def get(self, model_id: str) -> ModelCard:
        """One card; 404 (OpenAI's model_not_found) for an id `list` does not hold."""
        for card in self.list().data:
            if card.id == model_id:
                return card
        raise APIError(
            404,
            f"the model {model_id!r} does not exist; this server serves "
            f"{self.ctx.model_name!r} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )
