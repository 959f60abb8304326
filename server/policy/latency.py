"""The latency profile: predicted milliseconds per exit, and the least-squares fits that
fill it from measurements (soft-profile's and the server's start-up measurement, both in
server/profile.py).

Profile format (what `latency_profile` in soft.json holds; depths as strings, ms):
```json
{"prefill_ms_per_token": {"2": 0.05, "4": 0.09},
 "decode_ms_per_step":   {"2": 1.1,  "4": 1.9},      a decode step of one row
 "prefill_ms_base":      {"2": 0.4,  "4": 0.7},      (optional)
 "decode_ms_per_row":    {"2": 0.1,  "4": 0.2}}      (optional) each further row
```
Depths it does not list are interpolated linearly in the layers a token runs (cost is per
layer + head; a balcony exit below L runs its own layer too);
other keys are kept, not read. A step of a mixed batch costs the deepest row's one-row step
(every layer it needs runs once) plus `decode_ms_per_row` of each other row at that row's
depth.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def least_squares(points: Mapping[int, float]) -> tuple[float, float]:
    """The least-squares line (intercept, slope) through x -> y, the slope never negative
    (cost never falls as depth, prompt or batch grows). Needs two or more points."""
    return line_through(list(points.items()))


def line_through(pairs: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """`least_squares` over (x, y) pairs (several may share an x)."""
    xs = [x for x, _ in pairs]
    assert len(set(xs)) >= 2, "a line needs two points"
    mx, my = sum(xs) / len(xs), sum(y for _, y in pairs) / len(pairs)
    slope = sum((x - mx) * (y - my) for x, y in pairs) / sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 0.0)
    return my - slope * mx, slope


def fill(
    exits: Sequence[int],
    points: Mapping[int, float],
    layers: Callable[[int], int] | None = None,
) -> dict[int, float]:
    """Each exit's value: the table's own when it lists every exit, else a least-squares
    line through the known points in the layers a token runs at that depth (`layers`;
    default the depth itself; a balcony exit runs one layer more: its own) — cost is per
    layer + a fixed part; one point: through the origin; clamped so cost never falls as
    depth grows, nor below 0."""
    assert points, "a latency table needs at least one depth"
    x = layers or (lambda d: d)
    if len({x(d) for d in points}) == 1:
        d0 = next(iter(points))
        icpt, slope = 0.0, points[d0] / x(d0)
    else:
        icpt, slope = line_through([(x(d), y) for d, y in points.items()])
    out: dict[int, float] = {}
    prev = 0.0
    exact = all(d in points for d in exits)
    for d in sorted(exits):
        v = points[d] if exact else icpt + slope * x(d)
        prev = max(prev, v, 0.0)
        out[d] = prev
    return out


@dataclass(frozen=True)
class LatencyProfile:
    """Predicted milliseconds per exit: prefill = base + per_token * prompt_len; a decode
    step = one-row step of the deepest row + per_row of every other row."""

    prefill_ms_base: Mapping[int, float]
    prefill_ms_per_token: Mapping[int, float]
    decode_ms_per_step: Mapping[int, float]
    source: str  # "soft.json" | "measured" | "given" | a file
    decode_ms_per_row: Mapping[int, float] = field(default_factory=dict)  # {}: batch-free

    def prefill_ms(self, depth: int, prompt_len: int) -> float:
        return self.prefill_ms_base[depth] + self.prefill_ms_per_token[depth] * prompt_len

    def step_ms(self, depth: int) -> float:
        return self.decode_ms_per_step[depth]

    def batch_step_ms(self, depths: Sequence[int]) -> float:
        """One decode step of a batch whose rows run at `depths` (any order)."""
        if not depths:
            return 0.0
        rows = sorted(depths)
        extra = sum(self.decode_ms_per_row.get(d, 0.0) for d in rows[:-1])
        return self.decode_ms_per_step[rows[-1]] + extra

    @classmethod
    def from_points(
        cls,
        exits: Sequence[int],
        base: Mapping[int, float],
        per_token: Mapping[int, float],
        step: Mapping[int, float],
        source: str,
        per_row: Mapping[int, float] | None = None,
        layers: Callable[[int], int] | None = None,
    ) -> LatencyProfile:
        """Fill every exit from measurements at some depths (linear in the layers a token
        runs, `layers(depth)`, default the depth; never decreasing with depth, never
        negative)."""
        return cls(
            prefill_ms_base=fill(exits, base, layers),
            prefill_ms_per_token=fill(exits, per_token, layers),
            decode_ms_per_step=fill(exits, step, layers),
            source=source,
            decode_ms_per_row=fill(exits, per_row, layers) if per_row else {},
        )

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], exits: Sequence[int], source: str = "soft.json"
    ) -> LatencyProfile:
        """Read soft.json's `latency_profile`; raises ValueError naming the bad field."""

        def table(key: str, required: bool) -> dict[int, float]:
            raw = data.get(key)
            if raw is None and not required:
                return {}
            if not isinstance(raw, Mapping) or not raw:
                raise ValueError(f"latency_profile.{key} must be an object depth -> ms")
            try:
                return {int(k): float(v) for k, v in raw.items()}
            except (TypeError, ValueError) as e:
                raise ValueError(f"latency_profile.{key}: {e}") from e

        per_token = table("prefill_ms_per_token", True)
        step = table("decode_ms_per_step", True)
        base = table("prefill_ms_base", False) or dict.fromkeys(per_token, 0.0)
        per_row = table("decode_ms_per_row", False)
        return cls.from_points(exits, base, per_token, step, source, per_row)

    def to_json(self) -> dict[str, dict[str, float]]:
        def f(t: Mapping[int, float]) -> dict[str, float]:
            return {str(d): round(v, 4) for d, v in sorted(t.items())}

        out = {
            "prefill_ms_base": f(self.prefill_ms_base),
            "prefill_ms_per_token": f(self.prefill_ms_per_token),
            "decode_ms_per_step": f(self.decode_ms_per_step),
        }
        if self.decode_ms_per_row:
            out["decode_ms_per_row"] = f(self.decode_ms_per_row)
        return out


def read_profile_file(path: str, exits: Sequence[int]) -> LatencyProfile:
    """A profile from a JSON file: `soft-profile --out`'s, or a soft.json holding one.
    Raises ValueError naming the file (the server reports it and exits)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--latency-profile {path}: {e}") from e
    if isinstance(data, Mapping) and isinstance(data.get("latency_profile"), Mapping):
        data = data["latency_profile"]
    if not isinstance(data, Mapping):
        raise ValueError(f"--latency-profile {path}: expected a JSON object")
    try:
        return LatencyProfile.from_json(data, exits, source=path)
    except ValueError as e:
        raise ValueError(f"--latency-profile {path}: {e}") from e
