"""server/engine/runner.py: packing groups into forwards."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from server.engine.runner import PREFILL_GROUP_TOKENS, pack


def test_forwards_take_at_most_a_prefill_groups_worth_of_prompt_tokens() -> None:
    def group(tokens: int) -> Any:
        return SimpleNamespace(ids=torch.zeros(1, tokens))

    big, mid, small, decode = group(PREFILL_GROUP_TOKENS - 56), group(100), group(50), group(8)
    assert pack([big, mid, small], decode) == [[big], [mid, small, decode]]
    assert pack([], decode) == [[decode]] and pack([small], None) == [[small]]
    assert pack([], None) == []
