"""`python -m loadtest`: the command line. Parses and checks the options (bad input: a
message and exit status 2), plans the requests, runs them open-loop, writes the report."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.client import ClientConfig, OpenAIClient, check_target
from loadtest.output import write_report
from loadtest.report import summarize
from loadtest.runner import RunConfig, RunResult, run
from loadtest.schedule import (
    SCHEDULES,
    ArrivalProcess,
    PlannedRequest,
    RateProfile,
    SpecError,
    Workload,
    arrival_times,
    constant_profile,
    extend_profile,
    parse_budget_mix,
    parse_ramp,
    parse_range,
    parse_steps,
    plan_requests,
    ramp_profile,
    step_profile,
)

# Set to 1 (the tests do) to refuse any --url that is not a loopback address.
LOCAL_ONLY_ENV = "LOADTEST_LOCAL_ONLY"

DESCRIPTION = """\
Open-loop load generator for OpenAI-compatible servers (soft-serve, vLLM, ...).
Requests are launched at scheduled times whether or not earlier ones have finished, with a
mix of latency budgets (x-latency-budget), prompt and response lengths, streaming and
non-streaming, /v1/completions and /v1/chat/completions. Streaming requests measure time
to first token and inter-token latency; soft-serve's x-soft-depth / x-soft-predicted-ms
headers are recorded when present. Writes report.json (per-request records + summary),
summary.md (also printed) and PNG plots into --out."""

EPILOG = """\
schedules:
  poisson   Poisson arrivals at --rate requests/s
  constant  evenly spaced arrivals at --rate requests/s (t = 0, 1/rate, 2/rate, ...)
  step      --rate from t=0, then each RATE@SECONDS of --step sets a new rate:
            --schedule step --rate 2 --step 8@10,4@20  → 2/s, 8/s from 10 s, 4/s from 20 s
  ramp      the rate rises (or falls) linearly over --duration: --ramp 1:10
  step and ramp use Poisson arrivals unless --arrivals constant.

a request "met" its budget when it succeeded and its end-to-end latency (client side,
send to last byte) was at most its budget. 429 and 503 answers are counted as shed load.

exit status: 0 done, 1 no request succeeded, 2 bad options, 130 interrupted (the report of
what ran is still written).

examples:
  python -m loadtest --url http://127.0.0.1:8000 --rate 4 --duration 30 \\
      --budget-mix "250ms:0.3,1s:0.4,none:0.3"
  python -m loadtest --url http://127.0.0.1:8000 --schedule ramp --ramp 1:20 --duration 60
  python -m loadtest --url http://gpu-box:8000 --model meta-llama/Llama-3.1-8B \\
      --schedule step --rate 2 --step 8@10 --stream-fraction 1 --ignore-eos   # vLLM
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = p.add_argument_group("target")
    target.add_argument(
        "--url",
        metavar="URL",
        default="http://127.0.0.1:8000",
        help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine) [%(default)s]",
    )
    target.add_argument(
        "--model",
        metavar="NAME",
        default="default",
        help="'model' sent in every request [%(default)s]",
    )
    target.add_argument(
        "--api-key", metavar="KEY", default=None, help="sent as 'Authorization: Bearer KEY' [none]"
    )
    target.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=60.0,
        help="seconds a request may take before it counts as a timeout; in-flight requests "
        "are also given this long to finish after --duration [%(default)s]",
    )
    load = p.add_argument_group("arrivals")
    load.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="poisson",
        help="arrival schedule (see below) [%(default)s]",
    )
    load.add_argument(
        "--rate",
        metavar="R",
        type=float,
        default=4.0,
        help="requests/s for poisson and constant; the starting rate of step [%(default)s]",
    )
    load.add_argument(
        "--step",
        metavar="RATE@S,...",
        default=None,
        help="step schedule: RATE@SECONDS,... e.g. 8@10,4@20",
    )
    load.add_argument(
        "--ramp",
        metavar="START:END",
        default=None,
        help="ramp schedule: START:END requests/s, e.g. 1:10",
    )
    load.add_argument(
        "--arrivals",
        choices=("poisson", "constant"),
        default="poisson",
        help="arrival process of step and ramp schedules [%(default)s]",
    )
    load.add_argument(
        "--duration",
        metavar="S",
        type=float,
        default=30.0,
        help="seconds during which requests are launched [%(default)s]",
    )
    load.add_argument(
        "--warmup",
        metavar="S",
        type=float,
        default=0.0,
        help="requests launched in the first S seconds load the server but are not recorded "
        "(the report describes the load after the server has settled) [%(default)s]",
    )
    load.add_argument(
        "--steady",
        action="store_true",
        help="after --duration, keep offering the load it ended with (unrecorded) until every "
        "recorded request has finished: the last ones are measured under the load they were "
        "sent into, not in a server that empties (at most --timeout more seconds)",
    )
    load.add_argument(
        "--max-requests",
        metavar="N",
        type=int,
        default=1000,
        help="requests at most, whatever the duration [%(default)s]",
    )
    load.add_argument(
        "--concurrency",
        metavar="N",
        type=int,
        default=64,
        help="requests in flight at most; see --overflow for what happens beyond [%(default)s]",
    )
    load.add_argument(
        "--overflow",
        choices=("delay", "drop"),
        default="delay",
        help="a request arriving while --concurrency requests are in flight waits for a slot "
        "(delay, counted and timed) or is not sent (drop, counted) [%(default)s]",
    )
    load.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=0,
        help="seed of arrivals and the request mix [%(default)s]",
    )
    mix = p.add_argument_group("request mix")
    mix.add_argument(
        "--budget-mix",
        metavar="MIX",
        default="none:1",
        help="latency budget classes BUDGET:WEIGHT,...; BUDGET is 250ms, 1.5s, a number of "
        "ms, or none (no x-latency-budget header); weights are relative [%(default)s]",
    )
    mix.add_argument(
        "--prompt-tokens",
        metavar="MIN:MAX",
        default="16:128",
        help="prompt length MIN:MAX or N, in words of about one token each [%(default)s]",
    )
    mix.add_argument(
        "--max-tokens",
        metavar="MIN:MAX",
        default="16:64",
        help="max_tokens MIN:MAX or N [%(default)s]",
    )
    mix.add_argument(
        "--stream-fraction",
        metavar="F",
        type=float,
        default=0.5,
        help="share of streaming requests, 0..1 [%(default)s]",
    )
    mix.add_argument(
        "--chat-fraction",
        metavar="F",
        type=float,
        default=0.3,
        help="share sent to /v1/chat/completions, 0..1 [%(default)s]",
    )
    mix.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos=true (soft-serve and vLLM extension) so every response is "
        "max_tokens long",
    )
    output = p.add_argument_group("output")
    output.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help="report directory [runs/loadtest-<UTC time>/]",
    )
    output.add_argument("--quiet", action="store_true", help="no live progress line on stderr")
    return p


@dataclass(frozen=True)
class LoadTest:
    """Everything a run needs, checked: the parsed command line."""

    client: ClientConfig
    run: RunConfig
    profile: RateProfile
    arrivals: ArrivalProcess
    workload: Workload
    max_requests: int
    seed: int
    out: Path

    warmup_s: float = 0.0

    def plan(self) -> list[PlannedRequest]:
        """The measured requests: arrivals in [warmup, duration), at most max_requests of
        them; around them, unmeasured: the warm-up's, and --steady's tail (--timeout long,
        at the rate the schedule ends with)."""
        run, profile = self.run, self.profile
        if run.steady:
            profile = extend_profile(profile, run.drain_s)
        times = arrival_times(profile, self.arrivals, self.seed)
        window = (times >= self.warmup_s) & (times < run.duration_s)
        last = np.flatnonzero(window)[self.max_requests - 1 : self.max_requests]
        if len(last):  # max_requests measured ones: nothing after the last is measured
            window[last[0] + 1 :] = False
            if not run.steady:
                times = times[: last[0] + 1]
        return [
            replace(p, measured=bool(window[p.index]))
            for p in plan_requests(times, self.workload, self.seed)
        ]


def _positive(value: float, flag: str) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise SpecError(f"{flag} must be a number above 0, got {value:g}")


def _fraction(value: float, flag: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise SpecError(f"{flag} must be between 0 and 1, got {value:g}")


def load_test(args: argparse.Namespace, local_only: bool = False) -> LoadTest:
    """Check the parsed options; raises SpecError with a message naming the flag."""
    check_target(args.url, local_only)
    _positive(args.duration, "--duration")
    _positive(args.timeout, "--timeout")
    if not 0.0 <= args.warmup < args.duration:
        raise SpecError(
            f"--warmup must be at least 0 and below --duration ({args.duration:g}), "
            f"got {args.warmup:g}"
        )
    if args.max_requests < 1:
        raise SpecError(f"--max-requests must be at least 1, got {args.max_requests}")
    if args.concurrency < 1:
        raise SpecError(f"--concurrency must be at least 1, got {args.concurrency}")
    _fraction(args.stream_fraction, "--stream-fraction")
    _fraction(args.chat_fraction, "--chat-fraction")
    if args.step is not None and args.schedule != "step":
        raise SpecError("--step needs --schedule step")
    if args.ramp is not None and args.schedule != "ramp":
        raise SpecError("--ramp needs --schedule ramp")
    profile: RateProfile
    if args.schedule == "step":
        if args.step is None:
            raise SpecError("--schedule step needs --step RATE@SECONDS,... e.g. --step 8@10")
        if not (args.rate >= 0 and math.isfinite(args.rate)):
            raise SpecError(f"--rate must be ≥ 0, got {args.rate:g}")
        profile = step_profile(args.rate, parse_steps(args.step), args.duration)
        if profile.expected_count() <= 0:
            raise SpecError("the step schedule sends nothing: every rate is 0")
    elif args.schedule == "ramp":
        if args.ramp is None:
            raise SpecError("--schedule ramp needs --ramp START:END, e.g. --ramp 1:10")
        profile = ramp_profile(*parse_ramp(args.ramp), args.duration)
    else:
        _positive(args.rate, "--rate")
        profile = constant_profile(args.rate, args.duration)
    arrivals: ArrivalProcess = "constant" if args.schedule == "constant" else args.arrivals
    workload = Workload(
        budgets=parse_budget_mix(args.budget_mix),
        prompt_tokens=parse_range(args.prompt_tokens, "--prompt-tokens"),
        max_tokens=parse_range(args.max_tokens, "--max-tokens"),
        stream_fraction=args.stream_fraction,
        chat_fraction=args.chat_fraction,
    )
    out = args.out or Path("runs") / time.strftime("loadtest-%Y%m%d-%H%M%S", time.gmtime())
    return LoadTest(
        client=ClientConfig(
            url=args.url,
            model=args.model,
            api_key=args.api_key,
            timeout_s=args.timeout,
            ignore_eos=args.ignore_eos,
            max_connections=args.concurrency,
        ),
        run=RunConfig(
            duration_s=args.duration,
            concurrency=args.concurrency,
            overflow=args.overflow,
            drain_s=args.timeout,
            steady=args.steady,
        ),
        profile=profile,
        arrivals=arrivals,
        workload=workload,
        max_requests=args.max_requests,
        seed=args.seed,
        out=out,
        warmup_s=args.warmup,
    )


async def execute(test: LoadTest, plan: Sequence[PlannedRequest], quiet: bool) -> RunResult:
    """Run the plan; Ctrl-C (SIGINT) or SIGTERM stops it early, keeping what ran."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / OS
            pass
    client = OpenAIClient(test.client)
    try:
        return await run(plan, client, test.run, None if quiet else sys.stderr, stop)
    finally:
        await client.aclose()
        for sig in handled:
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        test = load_test(args, local_only=os.environ.get(LOCAL_ONLY_ENV, "") in ("1", "true"))
    except SpecError as e:
        parser.error(str(e))  # exits with status 2
    plan = test.plan()
    if not args.quiet:
        measured = sum(p.measured for p in plan)
        extra = f" (+ up to {len(plan) - measured} unrecorded)" if measured < len(plan) else ""
        print(
            f"[loadtest] {measured} requests{extra} over {test.run.duration_s:g}s "
            f"({args.schedule}) → {test.client.base}",
            file=sys.stderr,
        )
    result = asyncio.run(execute(test, plan, args.quiet))
    elapsed = result.elapsed_s
    if result.background:  # rates over the measured requests' own span, not the tail's
        ends = [r.sent_s + r.latency_ms / 1000.0 for r in result.records
                if r.sent_s is not None and r.latency_ms is not None]  # fmt: skip
        elapsed = max(ends, default=elapsed) - test.warmup_s
    summary = summarize(result.records, elapsed, test.run.duration_s - test.warmup_s)
    config: dict[str, Any] = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
    }
    if config.get("api_key"):
        config["api_key"] = "***"
    config.update(
        out=str(test.out), started_unix=result.started_unix, interrupted=result.interrupted
    )
    files = write_report(test.out, result.records, summary, config, test.profile.rate_at)
    print(files.markdown.read_text())
    print(
        f"[loadtest] wrote {files.json}, {files.markdown} and {len(files.plots)} plots",
        file=sys.stderr,
    )
    if result.interrupted:
        return 130
    return 0 if summary.ok > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
