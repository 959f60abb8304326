"""In-flight control: a running request that falls behind its deadline moves to a
shallower exit (never deeper), and the engine frees the dropped layers' KV blocks.

`DeadlineController.follow` wraps a request's event stream. After each token it projects
the finish (now + tokens left x the request's own recent inter-token time) and, when that
lands past the deadline, asks the engine for the deepest shallower exit whose step,
scaled by the latency profile, would still make it; the shallowest when none would.
Later tokens carry the new depth in their TokenEvents. Nothing is projected before the
request's own inter-token time is measured (its second token at a depth): the profile's
step is not this request's, and a fast request would be lowered on its first token.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence

from server.engine.types import EngineClient, GenerationRequest, TokenEvent
from server.policy.latency import LatencyProfile


class DeadlineController:
    def __init__(
        self,
        engine: EngineClient,  # lower_depth(request_id, depth)
        exits: Sequence[int],
        profile: LatencyProfile,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine, self.exits, self.profile, self.clock = engine, sorted(exits), profile, clock
        self.lowered = 0  # requests moved to a shallower exit since start

    async def follow(
        self, request: GenerationRequest, events: AsyncIterator[TokenEvent]
    ) -> AsyncIterator[TokenEvent]:
        """Yield `events` unchanged, lowering the request's depth when it falls behind."""
        deadline = request.deadline
        if deadline is None:
            async for ev in events:
                yield ev
            return
        depth, asked = request.depth, request.depth
        n, last, gap_ms = 0, None, None
        async for ev in events:
            yield ev
            if ev.token_id is None or ev.finish_reason is not None:
                continue
            now = self.clock()
            n += 1
            if ev.depth and ev.depth < depth:  # the lowering took effect: re-measure
                depth, gap_ms, last = ev.depth, None, None
            if last is not None:
                dt = (now - last) * 1000.0
                gap_ms = dt if gap_ms is None else 0.5 * gap_ms + 0.5 * dt
            last = now
            left = request.params.max_tokens - n
            if left <= 0 or asked <= self.exits[0] or gap_ms is None:
                continue
            target = self.pick(depth, gap_ms, left, (deadline - now) * 1000.0)
            if target < asked:
                asked = target
                self.lowered += 1
                self.engine.lower_depth(request.request_id, target)

    def pick(self, depth: int, per_token_ms: float, left: int, remaining_ms: float) -> int:
        """The exit to finish at: `depth` when `left` tokens at `per_token_ms` make the
        deadline, else the deepest shallower exit that would (the shallowest if none)."""
        if left * per_token_ms <= remaining_ms:
            return depth
        base = self.profile.step_ms(depth)
        for d in reversed([e for e in self.exits if e < depth]):
            scaled = per_token_ms * self.profile.step_ms(d) / base if base > 0 else per_token_ms
            if left * scaled <= remaining_ms:
                return d
        return self.exits[0]
