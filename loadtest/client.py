"""An OpenAI-compatible HTTP client that measures: one `RequestRecord` per request.

Speaks `/v1/completions` and `/v1/chat/completions`, streaming (SSE, for time to first
token and inter-token latency) or not. Sends `x-latency-budget` when the request's class
has a budget and reads soft-serve's `x-soft-depth` / `x-soft-predicted-ms` headers (or the
body's `"soft"` object); against other servers (vLLM, …) those fields stay `None`.

Every failure is a record, never an exception: an HTTP error keeps its status code (429 and
503 are the server shedding load, not a crash), a timeout or a broken connection keeps a
short error kind.
"""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from loadtest.schedule import PlannedRequest, SpecError

# Common English words: about one token each in LLaMA/GPT-style BPE vocabularies, so a
# prompt of n words is close to n tokens (the server's usage field reports the real count).
WORDS = (
    "the of and to in is was for on that with as it by at from his he an be this are "
    "or had not but which have were one they you all her she there would their we him "
    "been has when who will more no if out so said what up its about into than them can "
    "only other new some could time these two may then do first any my now such like our "
    "over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state"
).split()


def make_prompt(n_words: int, index: int) -> str:
    """A deterministic prompt of `n_words` words, different for each request index."""
    step = 7 + 2 * (index % 11)  # a stride of its own per request: prompts differ early
    words = [WORDS[(index + k * step) % len(WORDS)] for k in range(n_words)]
    return "Continue this text: " + " ".join(words)


def check_target(url: str, local_only: bool) -> None:
    """Raise SpecError for a URL that is not http(s) or, with `local_only`, not loopback."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError(f"--url {url!r}: write e.g. http://127.0.0.1:8000")
    if not local_only:
        return
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SpecError(f"--url {url!r}: only loopback targets are allowed here (local-only mode)")


@dataclass(frozen=True)
class ClientConfig:
    """Where to send and how. `url` is the server root (a trailing /v1 is accepted)."""

    url: str
    model: str = "default"
    api_key: str | None = None
    timeout_s: float = 60.0  # whole request, first byte to last
    ignore_eos: bool = False  # vLLM/soft-serve extension: generate exactly max_tokens
    max_connections: int = 64

    @property
    def base(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"


@dataclass
class RequestRecord:
    """What happened to one planned request. Times are seconds from the start of the run,
    durations milliseconds. `error` is None exactly when the request succeeded."""

    index: int
    scheduled_s: float
    endpoint: str  # "completions" | "chat"
    stream: bool
    budget: str  # the budget class label, e.g. "250ms" or "none"
    budget_ms: float | None
    prompt_tokens_target: int
    max_tokens: int
    sent_s: float | None = None  # None: never sent (dropped by the concurrency limit)
    delay_ms: float = 0.0  # held back by the concurrency limit before sending
    status: int | None = None  # HTTP status; None when no response arrived
    error: str | None = None  # "http" | "timeout" | "connect" | "protocol" | "dropped" | ...
    message: str | None = None
    latency_ms: float | None = None  # send → last byte
    ttft_ms: float | None = None  # send → first content (streaming only)
    itl_ms: list[float] = field(default_factory=list)  # gaps between content chunks
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if sent
    finish_reason: str | None = None
    depth: int | None = None  # x-soft-depth, when the server says
    predicted_ms: float | None = None  # x-soft-predicted-ms, when the server says
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def done_s(self) -> float | None:
        if self.sent_s is None or self.latency_ms is None:
            return None
        return self.sent_s + self.latency_ms / 1000.0

    @property
    def lag_ms(self) -> float | None:
        """Sent this much after its scheduled time, not counting the concurrency-limit hold:
        more than a few ms means the load generator itself could not keep up."""
        if self.sent_s is None:
            return None
        return (self.sent_s - self.scheduled_s) * 1000.0 - self.delay_ms

    @property
    def met_budget(self) -> bool | None:
        """True/False for a completed request with a budget; None otherwise."""
        if self.budget_ms is None or not self.ok or self.latency_ms is None:
            return None
        return self.latency_ms <= self.budget_ms

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["ok"] = self.ok
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**fields)


def new_record(req: PlannedRequest) -> RequestRecord:
    return RequestRecord(
        index=req.index,
        scheduled_s=req.at,
        endpoint="chat" if req.chat else "completions",
        stream=req.stream,
        budget=req.budget.label,
        budget_ms=req.budget.budget_ms,
        prompt_tokens_target=req.prompt_tokens,
        max_tokens=req.max_tokens,
    )


class OpenAIClient:
    """One pooled httpx client for the whole run; `send` never raises for HTTP trouble."""

    def __init__(self, config: ClientConfig, transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        headers = {"user-agent": "soft-serve-loadtest"}
        if config.api_key:
            headers["authorization"] = f"Bearer {config.api_key}"
        # the pool holds every in-flight request: a smaller pool would queue requests
        # inside httpx, a delay the load tester could not see or report
        limits = httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_connections,
        )
        self._http = httpx.AsyncClient(
            base_url=config.base,
            headers=headers,
            limits=limits,
            timeout=httpx.Timeout(config.timeout_s),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def body(self, req: PlannedRequest) -> dict[str, Any]:
        prompt = make_prompt(req.prompt_tokens, req.index)
        body: dict[str, Any] = {
            "model": self.config.model,
            "max_tokens": req.max_tokens,
            "temperature": 0.0,
            "stream": req.stream,
        }
        if req.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if req.stream:
            body["stream_options"] = {"include_usage": True}
        if self.config.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def send(self, req: PlannedRequest, record: RequestRecord, origin: float) -> None:
        """Send `req`, filling `record` in place; `origin` is the run's perf_counter zero."""
        headers = {}
        if req.budget.budget_ms is not None:
            headers["x-latency-budget"] = f"{req.budget.budget_ms:g}ms"
        path = "/chat/completions" if req.chat else "/completions"
        await self.post(path, self.body(req), record, origin, headers)

    async def post(
        self,
        path: str,
        body: dict[str, Any],
        record: RequestRecord,
        origin: float,
        headers: dict[str, str] | None = None,
        text: list[str] | None = None,
    ) -> None:
        """POST `body` (streamed when body["stream"]) to `path` under /v1, filling `record`
        in place; `text` (when given) collects the output text, piece by piece."""
        start = time.perf_counter()
        record.sent_s = start - origin
        try:
            async with self._http.stream("POST", path, json=body, headers=headers or {}) as resp:
                record.status = resp.status_code
                read_soft_headers(record, resp.headers)
                if resp.status_code != 200:
                    await resp.aread()
                    fail_http(record, resp)
                elif body.get("stream"):
                    await read_stream(record, resp, start, text)
                else:
                    read_body(record, json.loads(await resp.aread()), text)
        except httpx.TimeoutException:
            record.error, record.message = "timeout", f"no answer within {self.config.timeout_s}s"
        except httpx.TransportError as e:
            record.error, record.message = "connect", f"{type(e).__name__}: {e}"
        except (ValueError, KeyError, TypeError, IndexError) as e:
            record.error, record.message = "protocol", f"unexpected response: {e}"
        record.latency_ms = (time.perf_counter() - start) * 1000.0


def read_soft_headers(record: RequestRecord, headers: httpx.Headers) -> None:
    depth, predicted = headers.get("x-soft-depth"), headers.get("x-soft-predicted-ms")
    if depth is not None and depth.strip().isdigit():
        record.depth = int(depth)
    if predicted is not None:
        try:
            record.predicted_ms = float(predicted)
        except ValueError:
            pass
    retry = headers.get("retry-after")
    if retry is not None:
        try:
            record.retry_after_s = float(retry)
        except ValueError:
            pass


def fail_http(record: RequestRecord, resp: httpx.Response) -> None:
    record.error = "http"
    try:
        record.message = str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        record.message = resp.text[:200]


def read_body(record: RequestRecord, body: dict[str, Any], text: list[str] | None = None) -> None:
    choice = body["choices"][0]
    record.finish_reason = choice.get("finish_reason")
    if text is not None:
        text.append(choice.get("text") or (choice.get("message") or {}).get("content") or "")
    read_usage(record, body.get("usage"))
    soft = body.get("soft")
    if isinstance(soft, dict):
        if record.depth is None and isinstance(soft.get("depth"), int):
            record.depth = soft["depth"]
        if record.predicted_ms is None and isinstance(soft.get("predicted_ms"), int | float):
            record.predicted_ms = float(soft["predicted_ms"])


def read_usage(record: RequestRecord, usage: Any) -> None:
    if isinstance(usage, dict):
        record.completion_tokens = usage.get("completion_tokens", record.completion_tokens)
        record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            record.cached_tokens = details["cached_tokens"]


async def read_stream(
    record: RequestRecord, resp: httpx.Response, start: float, sink: list[str] | None = None
) -> None:
    """Read SSE `data:` events to `[DONE]`: the first content chunk gives TTFT, the gaps
    between content chunks the inter-token latencies (a chunk may carry several tokens);
    `sink` (when given) collects the text."""
    last: float | None = None
    chunks = 0
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            if record.completion_tokens is None:
                record.completion_tokens = chunks
            return
        event = json.loads(data)
        if "error" in event:
            record.error = "stream"
            record.message = str(event["error"].get("message", event["error"]))
            return
        read_usage(record, event.get("usage"))
        for choice in event.get("choices") or ():
            text = choice.get("text")
            if text is None:
                text = (choice.get("delta") or {}).get("content")
            if text:
                if sink is not None:
                    sink.append(text)
                now = time.perf_counter()
                if last is None:
                    record.ttft_ms = (now - start) * 1000.0
                else:
                    record.itl_ms.append((now - last) * 1000.0)
                last = now
                chunks += 1
            if choice.get("finish_reason"):
                record.finish_reason = choice["finish_reason"]
    record.error, record.message = "protocol", "the stream ended without data: [DONE]"
