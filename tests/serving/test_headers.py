"""Request headers the depth policy reads: budgets, budget mode."""

from __future__ import annotations

import pytest

from server.serving.errors import APIError
from server.serving.headers import Hints, parse_budget, parse_budget_mode, read_hints


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


def test_hint_headers_are_parsed_once_into_values() -> None:
    sent = {"x-latency-budget": "1.5s", "x-soft-depth": " 2 ", "x-llm-d-slo-ttft-ms": "40",
            "x-slo-tpot-ms": "7", "x-llm-d-slo-tpot-ms": "9",
            "x-latency-budget-mode": "strict"}  # fmt: skip
    h = read_hints(1.0, sent.get)
    assert h == Hints(arrival=1.0, budget_ms=1500.0, depth=2, strict=True, slo_ttft_ms=40.0,
                      slo_tpot_ms=7.0)  # fmt: skip
    assert read_hints(2.0, {}.get) == Hints(arrival=2.0)
    for name, bad in [("x-soft-depth", "2.0"), ("x-llm-d-slo-tpot-ms", "soon")]:
        with pytest.raises(APIError) as e:
            read_hints(0.0, {**sent, name: bad}.get)
        assert e.value.status == 400 and e.value.param == name
