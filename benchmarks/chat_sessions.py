"""Multi-turn chat sessions that share a long system prompt: the workload of prefix caches
(`python -m benchmarks.peers --workload chat`).

Every session opens with the same system prompt (`--system-words` words, ~1,100 tokens
by default) and a user turn of its own, and goes on for `--turns` turns: each request
carries the whole conversation so far (system prompt, every user turn, every answer as
the server wrote it) to streamed /v1/chat/completions, for `--max-tokens` answer tokens
(ignore_eos, temperature 0). A level runs `sessions` sessions at once, each sending its
next turn when the last answer is in (closed loop), over a system prompt no earlier level
used (no level warms the next). Per level: TTFT p50 / p95 of the first turns (only the
system prompt can be cached) and of the later turns (the conversation so far can be),
aggregate output tok/s, and the share of prompt tokens the server reports as cached
(`usage.prompt_tokens_details.cached_tokens`, where it says).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.stats import failures, pct
from loadtest.client import ClientConfig, OpenAIClient, RequestRecord, make_prompt


class WarmupFailed(RuntimeError):
    """The server failed warm-up requests: it is not measured."""


PREAMBLE = "You are a helpful assistant. Read these notes before the conversation starts: "
WARMUP_LEVEL = 99  # the warm-up's own system prompt and user turns


def system_prompt(words: int, level: int) -> str:
    """The system prompt of level `level` (a different text per level)."""
    return PREAMBLE + make_prompt(words, 5000 + level).removeprefix("Continue this text: ")


def user_turn(words: int, level: int, session: int, turn: int) -> str:
    return make_prompt(words, 100_000 * (level + 1) + 100 * session + turn)


@dataclass
class ChatLevel:
    """Results of `sessions` sessions at once. Times in ms; tok/s are output tokens."""

    sessions: int
    turns: int
    requests: int
    ok: int
    errors: dict[str, int]
    wall_s: float
    output_tokens: int
    aggregate_tok_s: float
    prompt_tokens_mean: float | None  # as the server counts them (usage)
    cached_share: float | None  # cached / prompt tokens, over requests that report both
    ttft_first_ms_p50: float | None  # first turns: the system prompt + one user turn
    ttft_first_ms_p95: float | None
    ttft_later_ms_p50: float | None  # later turns: the conversation so far + one turn
    ttft_later_ms_p95: float | None
    ttft_ms_p50: float | None  # every turn
    ttft_ms_p95: float | None
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)


async def session(
    client: OpenAIClient, model: str, system: str, user: list[str], max_tokens: int,
    origin: float,
) -> list[tuple[RequestRecord, str]]:  # fmt: skip
    """One conversation, turn after turn: each request's record and answer, in order."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    records: list[tuple[RequestRecord, str]] = []
    for turn, text in enumerate(user):
        messages.append({"role": "user", "content": text})
        body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        record = RequestRecord(index=turn, scheduled_s=0.0, endpoint="chat", stream=True,
                               budget="none", budget_ms=None, prompt_tokens_target=0,
                               max_tokens=max_tokens)  # fmt: skip
        parts: list[str] = []
        await client.post("/chat/completions", body, record, origin, text=parts)
        answer = "".join(parts)
        records.append((record, answer))
        if not record.ok:
            break  # the conversation cannot go on without its answer
        messages.append({"role": "assistant", "content": answer})
    return records


async def run_level(
    client: OpenAIClient, model: str, level: int, sessions: int, turns: int,
    system_words: int, user_words: int, max_tokens: int,
) -> ChatLevel:  # fmt: skip
    system = system_prompt(system_words, level)
    origin = time.perf_counter()
    runs = await asyncio.gather(*(
        session(client, model, system,
                [user_turn(user_words, level, s, t) for t in range(turns)], max_tokens, origin)
        for s in range(sessions)
    ))  # fmt: skip
    wall = time.perf_counter() - origin
    turns_run = [t for run in runs for t in run]
    records = [r for r, _ in turns_run]
    good = [r for r in records if r.ok]
    errors = failures(records)
    tokens = sum(r.completion_tokens or 0 for r in good)
    first = [r.ttft_ms for r in good if r.index == 0 and r.ttft_ms is not None]
    later = [r.ttft_ms for r in good if r.index > 0 and r.ttft_ms is not None]
    counted = [r for r in good if r.prompt_tokens and r.cached_tokens is not None]
    prompts = [r.prompt_tokens for r in good if r.prompt_tokens]
    cached = sum(r.cached_tokens or 0 for r in counted)

    def ms(xs: list[float], q: float) -> float | None:
        v = pct(xs, q)
        return None if v is None else round(v, 1)

    return ChatLevel(
        sessions=sessions,
        turns=turns,
        requests=len(records),
        ok=len(good),
        errors=errors,
        wall_s=round(wall, 3),
        output_tokens=tokens,
        aggregate_tok_s=round(tokens / wall, 2),
        prompt_tokens_mean=round(sum(prompts) / len(prompts), 1) if prompts else None,
        cached_share=round(cached / sum(r.prompt_tokens or 0 for r in counted), 3)
        if counted
        else None,
        ttft_first_ms_p50=ms(first, 0.5),
        ttft_first_ms_p95=ms(first, 0.95),
        ttft_later_ms_p50=ms(later, 0.5),
        ttft_later_ms_p95=ms(later, 0.95),
        ttft_ms_p50=ms(first + later, 0.5),
        ttft_ms_p95=ms(first + later, 0.95),
        records=[turn_record(r, text) for r, text in turns_run],
    )


def turn_record(r: RequestRecord, text: str) -> dict[str, Any]:
    return {"turn": r.index, "ok": r.ok, "ttft_ms": r.ttft_ms, "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens, "text": text}  # fmt: skip


def same_answers(a: dict[str, Any], b: dict[str, Any]) -> str:
    """`identical/compared`: the answers two rows' runs of one level gave turn by turn
    (sessions in order), e.g. a server with its prefix cache against itself without;
    `-` where either run kept no answers."""
    pairs = list(zip(a.get("records") or [], b.get("records") or [], strict=False))
    if not pairs or not all("text" in x and "text" in y for x, y in pairs):
        return "-"
    same = sum(1 for x, y in pairs if x["ok"] and y["ok"] and x["text"] == y["text"])
    return f"{same}/{len(pairs)}"


async def measure_chat(url: str, model: str, args: Any) -> list[ChatLevel]:
    """Warm the server up on a conversation of its own (two turns, then `--warmup`
    sessions at once), then one level per `--sessions` entry."""
    config = ClientConfig(url=url, model=model, ignore_eos=True, timeout_s=args.timeout,
                          max_connections=max(args.sessions))  # fmt: skip
    client = OpenAIClient(config)
    try:
        for n in (1, args.warmup):
            if n:
                w = await run_level(client, model, WARMUP_LEVEL + n, n, 2, args.system_words,
                                    args.user_words, args.max_tokens)  # fmt: skip
                if w.ok < w.requests:
                    raise WarmupFailed(f"warm-up requests failed: {w.errors}")
        return [
            await run_level(
                client,
                model,
                i,
                s,
                args.turns,
                args.system_words,
                args.user_words,
                args.max_tokens,
            )  # fmt: skip
            for i, s in enumerate(args.sessions)
        ]
    finally:
        await client.aclose()
