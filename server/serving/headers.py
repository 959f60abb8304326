"""What a request asks of the depth policy besides its body: a pinned depth
(`"model": "<name>@<depth>"` or `x-soft-depth`), a latency budget (`x-latency-budget:
250ms | 1.5s | 250`, `x-latency-budget-mode`) and SLOs (`x-slo-ttft-ms`, `x-slo-tpot-ms`),
parsed into the policy's `DepthRequest`. Malformed values are the client's to fix: 400
naming the header."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from server.policy.policies import DepthRequest
from server.serving.errors import APIError, bad_request

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*$", re.IGNORECASE)
_DEPTH = re.compile(r"[0-9]{1,6}")  # ASCII digits only: int() of "²" or of 5000 digits fails


@dataclass(frozen=True)
class Hints:
    """What the HTTP layer read from the request besides the body."""

    arrival: float  # time.monotonic() at receipt
    budget: str | None = None  # x-latency-budget
    depth: str | None = None  # x-soft-depth
    budget_mode: str | None = None  # x-latency-budget-mode: strict | best-effort
    slo_ttft: str | None = None  # x-slo-ttft-ms (or x-llm-d-slo-ttft-ms)
    slo_tpot: str | None = None  # x-slo-tpot-ms (or x-llm-d-slo-tpot-ms)
    slo_ttft_header: str = "x-slo-ttft-ms"  # the name it came under, for errors
    slo_tpot_header: str = "x-slo-tpot-ms"


def parse_budget(value: str, header: str = "x-latency-budget") -> float:
    """`250ms`, `1.5s` or a bare number of milliseconds -> milliseconds (> 0).

    Raises:
        APIError: 400, malformed, zero, or not finite; `param` is `header`.
    """
    m = _BUDGET.match(value)
    ms = float(m.group(1)) * (1000.0 if (m.group(2) or "ms").lower() == "s" else 1.0) if m else 0
    if not m or not math.isfinite(ms) or ms <= 0:
        raise bad_request(
            f"{header} {value!r} is not a latency: use e.g. '250ms', '1.5s' or '250'", header
        )
    return ms


def parse_budget_mode(value: str | None) -> bool:
    """`x-latency-budget-mode`: `strict` (refuse what no exit meets) or `best-effort`.
    Returns True for strict."""
    mode = (value or "best-effort").strip().lower()
    if mode not in ("strict", "best-effort"):
        raise bad_request(
            f"x-latency-budget-mode {value!r}: use 'strict' or 'best-effort'",
            "x-latency-budget-mode",
        )
    return mode == "strict"


def pinned_depth(model: str | None, served_name: str, hints: Hints) -> int | None:
    """The depth `model` ("<name>@<depth>") or x-soft-depth pins, None without a pin.
    Raises APIError: 404 for another model's name, 400 for a malformed or conflicting pin."""
    pin: int | None = None
    if model is not None and model != served_name:
        name, sep, depth = model.rpartition("@")
        if not sep or name != served_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves "
                f"{served_name!r} (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        if not _DEPTH.fullmatch(depth):
            raise bad_request(f"{model!r}: the depth after '@' must be a whole number", "model")
        pin = int(depth)
    if hints.depth is not None:
        value = hints.depth.strip()
        if not _DEPTH.fullmatch(value):
            raise bad_request(
                f"x-soft-depth {hints.depth!r} must be a whole number", "x-soft-depth"
            )
        if pin is not None and pin != int(value):
            raise bad_request(
                f"model pins depth {pin} but x-soft-depth says {value}", "x-soft-depth"
            )
        pin = int(value)
    return pin


def depth_request(
    model: str | None, served_name: str, hints: Hints, prompt_len: int, max_tokens: int
) -> DepthRequest:
    """The policy's view of one request: its sizes, pin, budget, SLOs and mode."""
    pin = pinned_depth(model, served_name, hints)
    budget = parse_budget(hints.budget) if hints.budget is not None else None
    ttft = None if hints.slo_ttft is None else parse_budget(hints.slo_ttft, hints.slo_ttft_header)
    tpot = None if hints.slo_tpot is None else parse_budget(hints.slo_tpot, hints.slo_tpot_header)
    strict = parse_budget_mode(hints.budget_mode)
    return DepthRequest(prompt_len, max_tokens, budget, pin, ttft, tpot, strict)
