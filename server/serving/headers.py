"""What a request asks of the depth policy besides its body: a pinned depth
(`"model": "<name>@<depth>"` or `x-soft-depth`), a latency budget (`x-latency-budget:
250ms | 1.5s | 250`, `x-latency-budget-mode`) and SLOs (`x-slo-ttft-ms`, `x-slo-tpot-ms`).
The headers are parsed once, into `Hints`, before the body is tokenized (`read_hints`);
with the body's model and sizes they make the policy's `DepthRequest`. Malformed values
are the client's to fix: 400 naming the header."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from server.policy.policies import DepthRequest
from server.serving.errors import APIError, bad_request

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*$", re.IGNORECASE)
_DEPTH = re.compile(r"[0-9]{1,6}")  # ASCII digits only: int() of "²" or of 5000 digits fails


@dataclass(frozen=True)
class Hints:
    """What the request asks besides its body, parsed from its headers (`read_hints`)."""

    arrival: float  # time.monotonic() at receipt
    budget_ms: float | None = None  # x-latency-budget
    depth: int | None = None  # x-soft-depth
    strict: bool = False  # x-latency-budget-mode: strict (else best-effort)
    slo_ttft_ms: float | None = None  # x-slo-ttft-ms (or x-llm-d-slo-ttft-ms)
    slo_tpot_ms: float | None = None  # x-slo-tpot-ms (or x-llm-d-slo-tpot-ms)


def read_hints(arrival: float, header: Callable[[str], str | None]) -> Hints:
    """Every hint a request's headers carry (`header(name)`: its value or None), parsed
    once, before its body is tokenized.

    Raises:
        APIError: 400 for a malformed value; `param` names its header.
    """
    budget = header("x-latency-budget")
    return Hints(
        arrival=arrival,
        depth=parse_depth_header(header("x-soft-depth")),
        budget_ms=None if budget is None else parse_budget(budget),
        slo_ttft_ms=parse_slo(header, "ttft"),
        slo_tpot_ms=parse_slo(header, "tpot"),
        strict=parse_budget_mode(header("x-latency-budget-mode")),
    )


def parse_slo(header: Callable[[str], str | None], kind: str) -> float | None:
    """x-slo-<kind>-ms, or llm-d's name for it, x-llm-d-slo-<kind>-ms, in milliseconds:
    the first wins when both are sent, but a malformed second one is still a 400."""
    names = (f"x-slo-{kind}-ms", f"x-llm-d-slo-{kind}-ms")
    sent = [parse_budget(value, name) for name in names if (value := header(name)) is not None]
    return sent[0] if sent else None


def parse_depth_header(value: str | None) -> int | None:
    """x-soft-depth: a whole number of layers, None when not sent."""
    if value is None:
        return None
    if not _DEPTH.fullmatch(value.strip()):
        raise bad_request(f"x-soft-depth {value!r} must be a whole number", "x-soft-depth")
    return int(value.strip())


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
        if pin is not None and pin != hints.depth:
            raise bad_request(
                f"model pins depth {pin} but x-soft-depth says {hints.depth}", "x-soft-depth"
            )
        pin = hints.depth
    return pin


def depth_request(
    model: str | None, served_name: str, hints: Hints, prompt_len: int, max_tokens: int,
    cached_tokens: Mapping[int, int] | None = None,
) -> DepthRequest:  # fmt: skip
    """The policy's view of one request: its sizes, pin, budget, SLOs and mode, and what
    of its prompt the prefix cache holds at each depth."""
    pin = pinned_depth(model, served_name, hints)
    return DepthRequest(prompt_len, max_tokens, hints.budget_ms, pin, hints.slo_ttft_ms,
                        hints.slo_tpot_ms, hints.strict, dict(cached_tokens or {}))  # fmt: skip
