"""Request headers the depth policy reads: budgets, budget mode."""

from __future__ import annotations

import pytest

from server.serving.errors import APIError
from server.serving.headers import parse_budget, parse_budget_mode


@pytest.mark.parametrize(
    "value, ms",
    [("250ms", 250.0), ("1.5s", 1500.0), ("250", 250.0), (" 40 MS ", 40.0), ("2S", 2000.0),
     (".5s", 500.0), ("0.25", 0.25)],
)  # fmt: skip
def test_parse_budget(value: str, ms: float) -> None:
    assert parse_budget(value) == pytest.approx(ms)


@pytest.mark.parametrize(
    "value", ["", "ms", "-1", "0", "0ms", "1.5m", "fast", "1e3", "nan", "1 s s"]
)
def test_parse_budget_rejects(value: str) -> None:
    with pytest.raises(APIError) as e:
        parse_budget(value)
    assert e.value.param == "x-latency-budget"


def test_budget_mode_is_strict_or_best_effort() -> None:
    assert parse_budget_mode("strict") and not parse_budget_mode(None)
    assert not parse_budget_mode(" Best-Effort ")
    with pytest.raises(APIError, match="strict"):
        parse_budget_mode("lenient")
