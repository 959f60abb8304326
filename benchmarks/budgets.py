"""Latency budgets under load: the default model served by a separate `soft-serve` process,
driven by `python -m loadtest`.

  1) soft-profile the model (--out FILE, served with --latency-profile FILE)
  2) full-depth saturation: requests pinned to the deepest exit, 32 in flight at a time;
     the completed rate is the saturation rate S
  3) --policy load, Poisson arrivals from 0.25 S to 2 S, a budget mix: budgets of 1x, 2x, 3x
     the shallowest exit's predicted latency in a batch with 8 full-depth rows (its tokens
     come out of the batch's steps, which the deepest row sets), a probe class that no
     exit meets (served at the shallowest, it gives that exit's median latency at that
     load), and requests without a budget
  4) --policy fixed at 2 S, the same mix: p95 of the requests without a budget against
     the load governor's, on one plot, with the governor's cap over time
Each load point of 3) and 4) is measured in steady state: its first --warmup seconds load
the server unrecorded, and the load goes on (unrecorded, `loadtest --steady`) until every
recorded request has finished.
Attainment counts the classes whose budget is at least 1.5x the shallowest exit's median
latency at that load; the cost model's error is median |x-soft-predicted-ms - latency| /
latency over every successful request. Writes JSON, PNGs and a markdown section to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.stats import pct

FRACTIONS = (0.25, 0.5, 1.0, 1.5, 2.0)
PROMPT, MAX_TOKENS = "16:64", "16:32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`python -m server` in its own process, on a free loopback port."""

    def __init__(self, model: str, policy: str, profile: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server", "--model", model, "--policy", policy,
               "--latency-profile", str(profile), "--port", str(self.port),
               "--log-level", "warning"]  # fmt: skip
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, "soft-serve exited; see its log"
            assert time.monotonic() < deadline, "soft-serve did not become ready"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class CapPoller:
    """soft_depth_cap and soft_num_requests_waiting from /metrics every 0.5 s."""

    def __init__(self, url: str) -> None:
        self.url, self.stop = url, threading.Event()
        self.samples: list[tuple[float, float | None, float | None]] = []  # t, cap, waiting
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                text = httpx.get(self.url + "/metrics", timeout=2).text
            except httpx.HTTPError:
                continue
            vals = {}
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name in ("soft_depth_cap", "soft_num_requests_waiting"):
                    vals[name] = float(value)
            self.samples.append((time.monotonic() - self.t0, vals.get("soft_depth_cap"),
                                 vals.get("soft_num_requests_waiting")))  # fmt: skip

    def __enter__(self) -> CapPoller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def loadtest(url: str, out: Path, rate: float, duration: float, mix: str, *extra: str) -> Any:
    cmd = [sys.executable, "-m", "loadtest", "--url", url, "--rate", str(round(rate, 3)),
           "--duration", str(duration), "--budget-mix", mix, "--prompt-tokens", PROMPT,
           "--max-tokens", MAX_TOKENS, "--ignore-eos", "--stream-fraction", "0.5",
           "--chat-fraction", "0", "--timeout", "90", "--max-requests", "5000", "--seed", "1",
           "--quiet", "--out", str(out), *extra]  # fmt: skip
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/performance/budgets"))
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per load point [30]")
    ap.add_argument("--warmup", type=float, default=5.0,
                    help="of which the first seconds are not recorded [5]")  # fmt: skip
    ap.add_argument("--model", default="default", help="checkpoint [default]")
    ap.add_argument("--reuse-profile", action="store_true",
                    help="keep --out/profile.json from an earlier run")  # fmt: skip
    ap.add_argument("--saturation-s", type=float, default=12.0, help="saturation probe [12]")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    from models.checkpoint import read_soft_json
    from models.loader import resolve
    from server.policy.latency import read_profile_file

    # 1) profile
    prof_path = out / "profile.json"
    if not (args.reuse_profile and prof_path.exists()):
        subprocess.run([sys.executable, "-m", "server.profile", args.model, "--out",
                        str(prof_path), "--png", str(out / "profile.png"), "--quiet",
                        "--repeats", "2"], check=True)  # fmt: skip
    directory = resolve(args.model)
    config_dir = directory
    if not (directory / "config.json").exists():  # a delta checkpoint: its base has the config
        delta = read_soft_json(directory, None)
        assert delta is not None and delta.base_model, f"{directory}: no config.json"
        config_dir = resolve(delta.base_model)
    num_layers = json.loads((config_dir / "config.json").read_text())["num_hidden_layers"]
    soft = read_soft_json(directory, num_layers)
    exits = sorted(soft.exits) if soft else list(range(1, num_layers + 1))
    profile = read_profile_file(str(prof_path), exits)
    lo, hi = exits[0], exits[-1]
    mean_p, mean_t, max_t = 40, 24, 32
    # a shallow request's tokens come out of the batch's steps, and the deepest row sets
    # the step: the shallowest exit sharing a batch with 8 full-depth rows
    shared_ms = profile.prefill_ms(lo, mean_p) + mean_t * profile.batch_step_ms([hi] * 8 + [lo])
    budgets = [round(k * shared_ms) for k in (1, 2, 3)]
    mix = ",".join([f"{b}ms:0.15" for b in budgets] + ["1ms:0.15", "none:0.4"])
    tpot = 2.0 * profile.step_ms(hi)  # the governor's default overload mark
    target_ms = profile.prefill_ms(hi, 64) + max_t * tpot
    result: dict[str, Any] = {
        "budgets_ms": budgets, "mix": mix, "profile": profile.to_json(),
        "no_budget_target_ms": target_ms, "governor_tpot_ms": tpot,
    }  # fmt: skip
    print(f"[budgets] profile done ({time.monotonic() - t_start:.0f}s): mix {mix}", flush=True)

    # 2) saturation, 3) sweep under --policy load: each load point measured in steady state
    # (a warm-up after the previous point, and the load kept on until its requests are done)
    steady = ("--warmup", str(args.warmup), "--steady")
    runs: dict[str, Any] = {}
    model = args.model
    name = "default" if model == "default" else Path(model).name
    with Server(model, "load", prof_path, out / "server-load.log") as srv:
        rep = loadtest(srv.url, out / "saturation", 50.0, args.saturation_s, "none:1", "--model",
                       f"{name}@{hi}", "--concurrency", "32", "--overflow", "drop")  # fmt: skip
        sat = rep["summary"]["throughput_rps"]
        result["saturation_rps"] = sat
        print(f"[budgets] full-depth saturation {sat:.2f} req/s", flush=True)
        for f in FRACTIONS:
            with CapPoller(srv.url) as poll:
                rep = loadtest(srv.url, out / f"load-{f}", f * sat, args.duration, mix,
                               "--concurrency", "1000", "--model", name, *steady)  # fmt: skip
            runs[f"load@{f}"] = {"records": rep["records"], "cap": poll.samples}
            print(f"[budgets] load {f}x done ({time.monotonic() - t_start:.0f}s)", flush=True)
    # 4) --policy fixed at 2x
    with Server(model, "fixed", prof_path, out / "server-fixed.log") as srv:
        with CapPoller(srv.url) as poll:
            rep = loadtest(srv.url, out / "fixed-2.0", 2.0 * sat, args.duration, mix,
                           "--concurrency", "1000", "--model", name, *steady)  # fmt: skip
        runs["fixed@2.0"] = {"records": rep["records"], "cap": poll.samples}

    # tables
    rows, errors_all = [], []
    for name, run in runs.items():
        recs = [r for r in run["records"] if r["sent_s"] is not None]
        ok = [r for r in recs if r["status"] == 200 and r["error"] is None]
        shallow = [r["latency_ms"] for r in ok if r["budget"] == "1ms"]
        med_shallow = statistics.median(shallow) if shallow else None
        errs = [abs(r["predicted_ms"] - r["latency_ms"]) / r["latency_ms"] for r in ok
                if r["predicted_ms"] is not None and r["latency_ms"]]  # fmt: skip
        errors_all += errs
        row: dict[str, Any] = {
            "run": name, "sent": len(recs), "ok": len(ok),
            "offered_rps": float(name.split("@")[1]) * result["saturation_rps"],
            "shallow_median_ms": med_shallow,
            "no_budget_p95_ms": pct([r["latency_ms"] for r in ok if r["budget"] == "none"], 0.95),
            "prediction_error_median": statistics.median(errs) if errs else None,
            "depths": {}, "classes": {},
        }  # fmt: skip
        for r in ok:
            row["depths"][str(r["depth"])] = row["depths"].get(str(r["depth"]), 0) + 1
        for b in budgets:
            mine = [r for r in recs if r["budget_ms"] == b]
            met = sum(1 for r in mine if r in ok and r["latency_ms"] <= b)
            eligible = med_shallow is not None and b >= 1.5 * med_shallow
            row["classes"][str(b)] = {"n": len(mine), "met": met, "eligible": eligible,
                                      "attainment": met / len(mine) if mine else None}  # fmt: skip
        rows.append(row)
    result["runs"] = rows
    result["prediction_error_median"] = statistics.median(errors_all) if errors_all else None
    result["wall_s"] = time.monotonic() - t_start
    (out / "budgets.json").write_text(json.dumps(result, indent=1))
    plots(runs, rows, result, out)
    md = markdown(result)
    (out / "section.md").write_text(md)
    print(md)
    return 0


def plots(runs: dict[str, Any], rows: list[dict[str, Any]], result: dict[str, Any],
          out: Path) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load_rows = [r for r in rows if r["run"].startswith("load")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for b in result["budgets_ms"]:
        xs = [r["offered_rps"] / result["saturation_rps"] for r in load_rows]
        ys = [100 * (r["classes"][str(b)]["attainment"] or 0) for r in load_rows]
        ax.plot(xs, ys, "o-", label=f"budget {b} ms")
    ax.axhline(99, color="k", ls=":", lw=1, label="99%")
    ax.set(xlabel="offered load / full-depth saturation rate", ylabel="budget met (%)",
           title="--policy load: budget attainment")  # fmt: skip
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "attainment.png", dpi=100)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, color in (("load@2.0", "tab:blue"), ("fixed@2.0", "tab:red")):
        recs = sorted((r for r in runs[name]["records"] if r["budget"] == "none"
                       and r["status"] == 200), key=lambda r: r["sent_s"])  # fmt: skip
        a.plot([r["sent_s"] for r in recs], [r["latency_ms"] for r in recs], ".", color=color,
               ms=3, label=f"--policy {name.split('@')[0]}")  # fmt: skip
        p95 = pct([r["latency_ms"] for r in recs], 0.95)
        if p95 is not None:
            a.axhline(
                p95, color=color, lw=1, ls="--", label=f"{name.split('@')[0]} p95 {p95:.0f} ms"
            )
        cap = [(t, c) for t, c, _ in runs[name]["cap"] if c is not None]
        if cap:
            b.step([t for t, _ in cap], [c for _, c in cap], where="post", color=color,
                   label=f"--policy {name.split('@')[0]}")  # fmt: skip
    a.axhline(result["no_budget_target_ms"], color="k", lw=1.5, label="target")
    a.set(xlabel="sent at (s)", ylabel="latency (ms)", yscale="log",
          title="requests without a budget at 2x the full-depth saturation rate")  # fmt: skip
    b.set(xlabel="s", ylabel="soft_depth_cap", title="depth cap (load governor)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "load_vs_fixed.png", dpi=100)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    budgets = result["budgets_ms"]
    head = ["offered (req/s)", "x saturation", "shallowest median ms", "1.5x that"]
    head += [f"{b} ms met" for b in budgets] + ["no-budget p95 ms", "pred. error", "depths"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        sm = r["shallow_median_ms"]
        cells = [f"{r['offered_rps']:.2f}", f"{r['run']}", f"{sm:.0f}" if sm else "-",
                 f"{1.5 * sm:.0f}" if sm else "-"]  # fmt: skip
        for b in budgets:
            c = r["classes"][str(b)]
            att = "-" if c["attainment"] is None else f"{100 * c['attainment']:.1f}%"
            cells.append(f"{att} ({c['met']}/{c['n']})" + ("" if c["eligible"] else " †"))
        p95 = r["no_budget_p95_ms"]
        err = r["prediction_error_median"]
        cells += [f"{p95:.0f}" if p95 else "-", f"{100 * err:.0f}%" if err is not None else "-"]
        top = sorted(r["depths"].items(), key=lambda kv: -kv[1])[:4]
        cells.append(", ".join(f"{d}:{n}" for d, n in top))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\n† budget below 1.5x the shallowest exit's median latency at that load (not in "
        f"the target). Saturation: {result['saturation_rps']:.2f} req/s at full depth. "
        f"No-budget target: {result['no_budget_target_ms']:.0f} ms. Cost model median "
        f"|predicted - actual| / actual: {100 * (result['prediction_error_median'] or 0):.1f}%. "
        f"Wall time {result['wall_s'] / 60:.1f} min.\n"
    )


if __name__ == "__main__":
    os.environ.setdefault("LOADTEST_LOCAL_ONLY", "1")
    raise SystemExit(main())
