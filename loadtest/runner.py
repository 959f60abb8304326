"""The open-loop run: every planned request is launched at its scheduled time, whether or
not earlier ones have finished (a closed loop would slow down with the server and hide
its queueing). A concurrency limit caps requests in flight; a request that meets a full
limit is either held until a slot frees (`delay`, counted and timed) or not sent at all
(`drop`, counted). The run stops by itself: the plan is bounded by --duration and
--max-requests, and requests still in flight `drain_s` after the last arrival are cancelled.

Requests the plan marks unmeasured are background load, sent but never recorded: those of
the warm-up, and with `steady` those of the tail, which keeps offering the load after
`duration_s` until every measured request has finished, so the last ones are measured
under the load they were sent into rather than in an emptying server.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TextIO

import numpy as np

from loadtest.client import RequestRecord, new_record
from loadtest.schedule import PlannedRequest

Overflow = Literal["delay", "drop"]


class Sender(Protocol):
    async def send(self, req: PlannedRequest, record: RequestRecord, origin: float) -> None: ...


@dataclass(frozen=True)
class RunConfig:
    duration_s: float  # arrivals happen in [0, duration_s)
    concurrency: int = 64  # requests in flight at most
    overflow: Overflow = "delay"  # what a request meeting a full limit does
    drain_s: float = 60.0  # after duration_s, how long in-flight requests may still finish
    steady: bool = False  # the plan's unmeasured tail runs until the measured requests end
    progress_interval_s: float = 0.5


@dataclass
class RunResult:
    records: list[RequestRecord]  # the measured requests only
    started_unix: float  # wall clock at t = 0 of the run
    elapsed_s: float
    interrupted: bool  # stopped early (Ctrl-C or `stop`)
    background: int = 0  # unmeasured requests sent (warm-up, steady tail)

    @property
    def delayed(self) -> int:
        return sum(r.delay_ms > 0 for r in self.records)

    @property
    def dropped(self) -> int:
        return sum(r.error == "dropped" for r in self.records)


class Progress:
    """Counters of the live one-line display: sent, ok, errors, in flight, the send rate
    over the last `window_s` seconds and the median latency of the last 200 completions."""

    def __init__(self, total: int, window_s: float = 5.0) -> None:
        self.total, self.window_s = total, window_s
        self.sent = self.ok = self.errors = self.dropped = self.in_flight = 0
        self._sends: deque[float] = deque()
        self._latencies: deque[float] = deque(maxlen=200)

    def on_send(self, now: float) -> None:
        self.sent += 1
        self.in_flight += 1
        self._sends.append(now)

    def on_done(self, record: RequestRecord) -> None:
        self.in_flight -= 1
        if record.ok:
            self.ok += 1
            if record.latency_ms is not None:
                self._latencies.append(record.latency_ms)
        else:
            self.errors += 1

    def line(self, now: float) -> str:
        while self._sends and self._sends[0] < now - self.window_s:
            self._sends.popleft()
        rate = len(self._sends) / min(self.window_s, max(now, 1e-9))
        p50 = f"{np.median(self._latencies):.0f}ms" if self._latencies else "-"
        drop = f" dropped={self.dropped}" if self.dropped else ""
        return (
            f"[loadtest] t={now:5.1f}s sent={self.sent}/{self.total} ok={self.ok} "
            f"errors={self.errors}{drop} in-flight={self.in_flight} rate={rate:.1f}/s p50={p50}"
        )


async def _show(progress: Progress, origin: float, interval: float, out: TextIO) -> None:
    tty = out.isatty()
    last_plain = -1e9
    while True:
        now = time.perf_counter() - origin
        if tty:
            out.write("\r\033[K" + progress.line(now))
            out.flush()
        elif now - last_plain >= 5.0:  # a log file gets a line every 5 s, not a flood
            out.write(progress.line(now) + "\n")
            out.flush()
            last_plain = now
        await asyncio.sleep(interval)


async def run(
    plan: Sequence[PlannedRequest],
    client: Sender,
    config: RunConfig,
    progress_out: TextIO | None = sys.stderr,
    stop: asyncio.Event | None = None,
) -> RunResult:
    """Run `plan` against `client`; returns one record per planned request, in plan order.

    Args:
        plan: requests with launch times (s from start), sorted by time.
        client: sends one request and fills its record (loadtest.client.OpenAIClient).
        config: concurrency limit, overflow behaviour, duration and drain time.
        progress_out: where the live progress line goes (None: nowhere).
        stop: set it to stop early; in-flight requests are cancelled, the result is kept.
    """
    stop = stop or asyncio.Event()
    records = [new_record(req) for req in plan]
    progress = Progress(len(plan))
    slots = asyncio.Semaphore(config.concurrency)
    origin = time.perf_counter()
    started_unix = time.time()

    async def one(req: PlannedRequest, record: RequestRecord) -> None:
        full = slots.locked()
        if full and config.overflow == "drop":
            record.error, record.message = "dropped", "the concurrency limit was full"
            progress.dropped += 1
            return
        held = time.perf_counter()
        try:
            async with slots:
                if full:  # waited for a slot: a delay the server never saw
                    record.delay_ms = max((time.perf_counter() - held) * 1000.0, 1e-6)
                progress.on_send(time.perf_counter() - origin)
                try:
                    await client.send(req, record, origin)
                finally:
                    progress.on_done(record)
        except asyncio.CancelledError:
            if record.error is None and record.latency_ms is None:
                record.error = "cancelled"
                record.message = "still waiting or running when the run ended"
            raise

    shower = None
    if progress_out is not None:
        shower = asyncio.create_task(
            _show(progress, origin, config.progress_interval_s, progress_out)
        )
    tasks: list[asyncio.Task[None]] = []
    interrupted = False
    try:
        measured: list[asyncio.Task[None]] = []
        pending = [0]  # measured requests not finished yet

        def measured_done() -> bool:
            return pending[0] == 0

        def one_finished(_: asyncio.Task[None]) -> None:
            pending[0] -= 1

        # 1) launch every request at its time, never waiting for earlier ones
        for req, record in zip(plan, records, strict=True):
            tail = config.steady and not req.measured and req.at >= config.duration_s
            wait = req.at - (time.perf_counter() - origin)
            if wait > 0 and not (tail and measured_done()):
                try:
                    await asyncio.wait_for(stop.wait(), timeout=wait)
                except TimeoutError:
                    pass
            if stop.is_set():
                interrupted = True
                break
            if tail and measured_done():
                break  # the tail has done its job
            tasks.append(asyncio.create_task(one(req, record)))
            if req.measured:
                measured.append(tasks[-1])
                pending[0] += 1
                tasks[-1].add_done_callback(one_finished)
        # 2) let in-flight requests finish, up to duration + drain (steady: the measured)
        waited = measured if config.steady else tasks
        if waited and not interrupted:
            left = config.duration_s + config.drain_s - (time.perf_counter() - origin)
            finished = asyncio.ensure_future(asyncio.wait(waited))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait(
                [finished, stopper], timeout=max(left, 0.0), return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in (finished, stopper):
                waiter.cancel()
            await asyncio.gather(finished, stopper, return_exceptions=True)
            interrupted = stop.is_set() and not all(t.done() for t in waited)
    finally:
        # 3) cancel whatever is left; its record says "cancelled"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if shower is not None:
            shower.cancel()
            await asyncio.gather(shower, return_exceptions=True)
            assert progress_out is not None
            prefix = "\r\033[K" if progress_out.isatty() else ""
            progress_out.write(prefix + progress.line(time.perf_counter() - origin) + "\n")
            progress_out.flush()
    for record in records[len(tasks) :]:  # never launched: the run was stopped
        record.error, record.message = "cancelled", "not sent: the run was stopped"
    background = sum(1 for req, r in zip(plan, records, strict=True)
                     if not req.measured and r.sent_s is not None)  # fmt: skip
    kept = [r for req, r in zip(plan, records, strict=True) if req.measured]
    return RunResult(kept, started_unix, time.perf_counter() - origin, interrupted, background)
