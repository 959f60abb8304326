"""The HTTP layer over a scripted engine (tests/fakes.py): shapes, headers, errors, depth
selection, stop strings, echo + logprobs as lm-evaluation-harness reads them, SSE."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import models
from server.http.app import create_app, serving_options
from server.metrics import Metrics
from server.policy.latency import LatencyProfile
from server.policy.policies import make_policy
from server.serving.openai import OpenAIServing
from server.settings import Settings
from tests.fakes import PROFILE, FakeEngine, make_served_checkpoint


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = make_served_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", profile=PROFILE)
    return models.load(path)


def make_client(
    model: Any, policy: str = "budget", settings: dict[str, Any] | None = None, **engine: Any
) -> tuple[TestClient, FakeEngine]:
    fake = FakeEngine(model, **engine)

    def loader(s: Settings) -> OpenAIServing:
        profile = LatencyProfile.from_json(PROFILE, model.exits)
        pol = make_policy(policy, model.exits, model.exits[-1], profile)
        return OpenAIServing(
            model, fake, pol, Metrics(model.exits), s.model_name(), serving_options(s)
        )

    app = create_app(Settings(model="/ckpt/tiny", **(settings or {})), loader=loader)
    return TestClient(app, raise_server_exceptions=False), fake


@pytest.fixture
def client(tiny_model: Any) -> Iterator[tuple[TestClient, FakeEngine]]:
    c, fake = make_client(tiny_model)
    with c:
        wait_ready(c)
        yield c, fake


def wait_ready(c: TestClient) -> None:
    """Until /health says the model is loaded (a real engine's start takes seconds)."""
    for _ in range(3000):
        if c.get("/health").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("server never became ready")


def complete(c: TestClient, headers: dict[str, str] | None = None, **body: Any) -> Any:
    body.setdefault("model", "tiny")
    body.setdefault("prompt", "Hello")
    return c.post("/v1/completions", json=body, headers=headers or {})


def sse_events(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def scripted(text_ids: list[int]) -> Callable[[Any], list[int]]:
    return lambda req: list(text_ids)


# -- endpoints ------------------------------------------------------------------------------
def test_health_is_503_while_loading_then_200(tiny_model: Any) -> None:
    release = threading.Event()

    def slow_loader(s: Settings) -> OpenAIServing:
        release.wait(10)
        profile = LatencyProfile.from_json(PROFILE, tiny_model.exits)
        pol = make_policy("budget", tiny_model.exits, 4, profile)
        return OpenAIServing(tiny_model, FakeEngine(tiny_model), pol, Metrics(), "tiny")

    with TestClient(create_app(Settings(model="tiny"), loader=slow_loader)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = complete(c)
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "loading"
        release.set()
        wait_ready(c)
        assert complete(c).status_code == 200


def test_models_lists_each_exit(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids == ["tiny", "tiny@2", "tiny@4"]
    card = c.get("/v1/models/tiny@2").json()
    assert (card["id"], card["parent"], card["depth"], card["object"]) == (
        "tiny@2",
        "tiny",
        2,
        "model",
    )
    assert c.get("/v1/models/tiny").json()["depth"] == 4
    missing = c.get("/v1/models/other")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    v = c.get("/version").json()
    assert v["model"] == "tiny" and v["exits"] == [2, 4] and v["num_layers"] == 4


def test_completion_shape_headers_and_soft(client: tuple[TestClient, FakeEngine]) -> None:
    c, fake = client
    r = complete(c, max_tokens=5, prompt="Hello there")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    n_prompt = len(tiny_ids(c, "Hello there"))
    assert body["usage"] == {
        "prompt_tokens": n_prompt,
        "completion_tokens": 5,
        "total_tokens": n_prompt + 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert r.headers["x-soft-depth"] == "4"  # no budget: the default, full depth
    predicted = 0.2 * n_prompt + 5 * 10.0
    assert float(r.headers["x-soft-predicted-ms"]) == pytest.approx(predicted, abs=0.05)
    assert body["soft"] == {"depth": 4, "budget_ms": None, "predicted_ms": pytest.approx(predicted)}
    assert fake.submitted[-1].depth == 4 and fake.active == {}


def tiny_ids(c: TestClient, text: str) -> list[int]:
    serving = c.app.state.soft.serving  # type: ignore[attr-defined]
    return list(serving.tokenizer(text)["input_ids"])


def test_budget_picks_deepest_exit_that_fits(client: tuple[TestClient, FakeEngine]) -> None:
    c, fake = client
    # prompt "Hello" is 1-2 tokens: depth 4 predicts ~100 ms for 10 tokens, depth 2 ~50 ms
    for budget, depth in [("1s", 4), ("120", 4), ("80ms", 2), ("0.06s", 2), ("1ms", 2)]:
        r = complete(c, headers={"x-latency-budget": budget}, max_tokens=10)
        assert r.status_code == 200, r.text
        assert r.headers["x-soft-depth"] == str(depth), budget
        assert r.json()["soft"]["depth"] == depth
        assert fake.submitted[-1].deadline is not None
    metrics = c.get("/metrics").text
    assert 'soft_latency_budget_total{outcome="infeasible"} 1.0' in metrics


@pytest.mark.parametrize("bad", ["fast", "-5ms", "0", "1.5 minutes", "ms", "", "1e309"])
def test_malformed_budget_is_400(client: tuple[TestClient, FakeEngine], bad: str) -> None:
    c, _ = client
    r = complete(c, headers={"x-latency-budget": bad})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "x-latency-budget"


def test_hint_headers_are_refused_before_the_prompt_is_tokenized(
    client: tuple[TestClient, FakeEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    c, _ = client
    serving = c.app.state.soft.serving  # type: ignore[attr-defined]

    async def tokenize(*args: object) -> object:
        raise AssertionError("the prompt was tokenized")

    monkeypatch.setattr(serving.text, "run", tokenize)
    for name, bad in [("x-latency-budget", "fast"), ("x-soft-depth", "two"),
                      ("x-llm-d-slo-ttft-ms", "soon")]:  # fmt: skip
        r = complete(c, headers={name: bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == name


def test_depth_pins(client: tuple[TestClient, FakeEngine]) -> None:
    c, fake = client
    r = complete(c, model="tiny@2", headers={"x-latency-budget": "10s"})
    assert r.status_code == 200 and r.headers["x-soft-depth"] == "2"
    assert r.json()["model"] == "tiny@2"
    r = complete(c, headers={"x-soft-depth": "2"})
    assert r.status_code == 200 and fake.submitted[-1].depth == 2
    r = complete(c, model="tiny@3")
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "2, 4" in r.json()["error"]["message"]
    r = complete(c, headers={"x-soft-depth": "3"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-soft-depth"
    r = complete(c, headers={"x-soft-depth": "two"})
    assert r.status_code == 400
    r = complete(c, model="tiny@2", headers={"x-soft-depth": "4"})
    assert r.status_code == 400
    for bad in ("tiny@x", "tiny@²", "tiny@" + "9" * 5000, "tiny@-2", "tiny@"):
        r = complete(c, model=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", bad
    for bad in ("9" * 5000, "2.0", "", "0x2"):
        r = complete(c, headers={"x-soft-depth": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-soft-depth", bad


def test_unknown_model_is_404(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    r = complete(c, model="gpt-4")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["param"] == "model" and err["code"] == "model_not_found" and "tiny" in err["message"]
    assert complete(c, model="other@2").status_code == 404


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": "lots"}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"logprobs": 50}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": [100000]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_input_is_400_with_param(
    client: tuple[TestClient, FakeEngine], body: dict[str, Any], param: str
) -> None:
    c, _ = client
    r = complete(c, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_empty_prompt_and_context_window(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    r = complete(c, prompt="")
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    r = complete(c, prompt="Hello", max_tokens=300)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "256" in msg and "300" in msg  # states the window and what was asked
    r = complete(c, prompt=[5] * 300, max_tokens=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    long = "x " * 10_000  # tokenized on a worker thread
    r = complete(c, prompt=long, max_tokens=1)
    assert r.status_code == 400 and "context window is 256" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_bad_json_oversize_and_unknown_route(tiny_model: Any) -> None:
    c, _ = make_client(tiny_model, settings={"max_body_bytes": 1000})
    with c:
        wait_ready(c)
        r = c.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        for content, ctype in [(b"[]", "application/json"), (b"", "application/json"),
                               (b'{"prompt": "x"}', "text/plain")]:  # fmt: skip
            r = c.post("/v1/completions", content=content, headers={"content-type": ctype})
            assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": "x" * 5000})
        assert r.status_code == 413 and "1000" in r.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:  # no content-length: counted as it streams
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        r = c.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()
        assert c.get("/v1/completions").status_code == 405
        assert complete(c).status_code == 200  # still answering


def test_unknown_fields_are_ignored(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    r = complete(c, frequency_penalty=0.0, logit_bias={}, best_of=1, suffix=None, whatever=[1])
    assert r.status_code == 200


def test_api_key(tiny_model: Any) -> None:
    c, _ = make_client(tiny_model, settings={"api_key": "s3cret"})
    with c:
        wait_ready(c)
        r = complete(c)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert complete(c, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert complete(c, headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200  # only /v1/* is protected
        assert c.get("/metrics").status_code == 200


def test_queue_full_is_429_with_retry_after(tiny_model: Any) -> None:
    c, fake = make_client(tiny_model, max_queue=2)
    with c:
        wait_ready(c)
        r = complete(c, n=3)
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert len(fake.aborted) == 2 and fake.active == {}  # all or nothing
        assert complete(c, n=2).status_code == 200


# -- generation details -----------------------------------------------------------------------
def test_n_and_prompt_batches(client: tuple[TestClient, FakeEngine]) -> None:
    c, fake = client
    r = complete(c, prompt=["Hello", "The capital"], n=3, max_tokens=4, seed=7)
    body = r.json()
    assert [ch["index"] for ch in body["choices"]] == list(range(6))
    texts = [ch["text"] for ch in body["choices"]]
    assert len(set(texts[:3])) == 3  # n choices of one prompt differ
    assert body["usage"]["completion_tokens"] == 24
    seeds = [q.params.seed for q in fake.submitted[-6:]]
    assert seeds == [7, 8, 9, 7, 8, 9]
    again = complete(c, prompt=["Hello", "The capital"], n=3, max_tokens=4, seed=7).json()
    assert [ch["text"] for ch in again["choices"]] == texts


def test_stop_string_is_cut_and_not_included(tiny_model: Any) -> None:
    tok = tiny_model.tokenizer
    ids = tok("Paris is nice. The capital of Italy is Rome.")["input_ids"]
    c, fake = make_client(tiny_model, script=scripted(ids))
    with c:
        wait_ready(c)
        r = complete(c, max_tokens=len(ids), stop=[" capital", "zzz"])
        ch = r.json()["choices"][0]
        assert ch["text"] == "Paris is nice. The" and ch["finish_reason"] == "stop"
        assert fake.aborted  # the engine was told to stop generating
        r = c.post(
            "/v1/completions",
            json={
                "model": "tiny",
                "prompt": "x",
                "stream": True,
                "max_tokens": len(ids),
                "stop": " capital",
            },
        )
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["text"] for e in events[:-1])
        assert text == "Paris is nice. The"
        assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_multibyte_characters_never_split(tiny_model: Any) -> None:
    tok = tiny_model.tokenizer
    text = "Zürich 東京 🙂!"
    ids = tok(text)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the script splits characters
    c, _ = make_client(tiny_model, script=scripted(ids))
    with c:
        wait_ready(c)
        r = c.post("/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": len(ids)})
        pieces = [e["choices"][0]["text"] for e in sse_events(r.text)[:-1]]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
        # a stop string inside a multi-byte run: cut before it, whole characters only
        r = complete(c, max_tokens=len(ids), stop="京")
        assert r.json()["choices"][0]["text"] == "Zürich 東"
        r = complete(c, max_tokens=len(ids), stop="🙂")
        assert r.json()["choices"][0]["text"] == "Zürich 東京 "


def test_eos_stops_and_is_not_shown(tiny_model: Any) -> None:
    tok = tiny_model.tokenizer
    ids = tok("Hi there")["input_ids"] + [tok.eos_token_id, 50, 51]
    c, _ = make_client(tiny_model, script=scripted(ids))
    with c:
        wait_ready(c)
        ch = complete(c, max_tokens=10).json()["choices"][0]
        assert ch == {"index": 0, "text": "Hi there", "logprobs": None, "finish_reason": "stop"}


def test_echo_logprobs_as_lm_eval_reads_them(client: tuple[TestClient, FakeEngine]) -> None:
    """lm-evaluation-harness local-completions: token-id prompts, max_tokens 1, echo,
    logprobs 1; reads token_logprobs[ctxlen:-1] and top_logprobs[ctxlen:-1]."""
    c, _ = client
    prompts = [[10, 11, 12, 13], [20, 21, 22]]
    r = complete(c, prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda ch: ch["index"])
    for ch, ids in zip(choices, prompts, strict=True):
        lp = ch["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1 == len(lp["token_logprobs"])
        assert len(lp["top_logprobs"]) == len(ids) + 1 == len(lp["text_offset"])
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
        assert all(isinstance(t, dict) and t for t in lp["top_logprobs"][1:])
        ctxlen = 1
        greedy = all(
            tok == max(top.values())
            for tok, top in zip(
                lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1], strict=True
            )
        )
        assert greedy
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
        assert ch["text"].startswith(c.app.state.soft.serving.tokenizer.decode(ids))  # type: ignore[attr-defined]
    # max_tokens 0 with echo: the prompt's logprobs only
    r = complete(c, prompt=prompts[0], max_tokens=0, echo=True, logprobs=0)
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 4 and r.json()["usage"]["completion_tokens"] == 0


def test_streaming_completion_with_usage(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    body = {
        "model": "tiny",
        "prompt": "Hello",
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": 2,
    }
    with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["x-soft-depth"] == "4"
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    tokens = [t for e in events[:-2] for t in e["choices"][0]["logprobs"]["tokens"]]
    assert len(tokens) == 4
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_chat_completion(client: tuple[TestClient, FakeEngine]) -> None:
    c, fake = client
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say hi"}]},
    ]
    r = c.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": msgs,
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 1,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["soft"]["depth"] == 4
    ch = body["choices"][0]
    assert ch["message"]["role"] == "assistant" and ch["finish_reason"] == "length"
    assert len(ch["logprobs"]["content"]) == 3
    assert len(ch["logprobs"]["content"][0]["top_logprobs"]) == 1
    prompt = fake.model.tokenizer.decode(fake.submitted[-1].prompt_ids)
    assert prompt.endswith("<|im_start|>assistant\n") and "Say hi" in prompt
    # no max_tokens: up to the context window
    r = c.post("/v1/chat/completions", json={"messages": msgs})
    assert fake.submitted[-1].params.max_tokens == 256 - len(fake.submitted[-1].prompt_ids)
    bad = c.post("/v1/chat/completions", json={"messages": []})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    bad = c.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert bad.status_code == 400


def test_chat_streaming(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
        "n": 2,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(c.post("/v1/chat/completions", json=body).text)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 6
    firsts = [e for e in events[:-2] if e["choices"][0]["delta"].get("role") == "assistant"]
    assert sorted(e["choices"][0]["index"] for e in firsts) == [0, 1]
    finals = [e for e in events[:-2] if e["choices"][0]["finish_reason"]]
    assert sorted(e["choices"][0]["index"] for e in finals) == [0, 1]
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-2])


def test_engine_error_mid_stream_is_an_sse_error_event(tiny_model: Any) -> None:
    c, fake = make_client(tiny_model)

    async def broken(request: Any) -> Any:
        from server.engine.types import TokenEvent

        yield TokenEvent(request.request_id, 40, depth=request.depth)
        yield TokenEvent(request.request_id, None, finish_reason="error", error="boom")

    with c:
        wait_ready(c)
        fake._run = broken  # type: ignore[method-assign]
        events = sse_events(c.post("/v1/completions", json={"prompt": "x", "stream": True}).text)
        assert any(isinstance(e, dict) and "error" in e for e in events)
        assert events[-1] == "[DONE]"
        r = complete(c)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"


def test_depth_lowered_mid_request_is_reported(tiny_model: Any) -> None:
    """The engine may move a request to a shallower exit; body, header, metrics follow."""
    from server.engine.types import TokenEvent

    c, fake = make_client(tiny_model)

    async def lowered(request: Any) -> Any:
        rid = request.request_id
        yield TokenEvent(rid, 40, depth=request.depth)
        yield TokenEvent(rid, 41, depth=2)
        yield TokenEvent(rid, 42, finish_reason="length", depth=2)

    with c:
        wait_ready(c)
        fake._run = lowered  # type: ignore[method-assign]
        r = complete(c, max_tokens=3)
        assert r.headers["x-soft-depth"] == "2" and r.json()["soft"]["depth"] == 2
        text = c.get("/metrics").text
        assert 'soft_generated_tokens_total{depth="2"} 3.0' in text


def test_metrics_endpoint_per_depth(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    complete(c, model="tiny@2", max_tokens=3)
    complete(c, max_tokens=2)
    text = c.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    lat = {
        s.labels["depth"]: s.value
        for s in fams["soft_request_latency_seconds"].samples
        if s.name.endswith("_count")
    }
    assert lat == {"2": 1.0, "4": 1.0}
    gen = {
        s.labels["depth"]: s.value
        for s in fams["soft_generated_tokens"].samples
        if s.name.endswith("_total")
    }
    assert gen == {"2": 3.0, "4": 2.0}
    assert fams["soft_kv_cache_usage_ratio"].samples[0].value == 0.0
    assert fams["soft_depth_cap"].samples[0].value == 4.0


def test_settings_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import build_parser, parse_settings

    monkeypatch.setenv("SOFT_PORT", "9001")
    monkeypatch.setenv("SOFT_KV_CACHE_MEMORY", "2GiB")
    monkeypatch.setenv("SOFT_POLICY", "fixed")
    s = parse_settings(["--policy", "budget", "--model", "/x/ckpt-7"])
    assert s.port == 9001 and int(s.kv_cache_memory) == 2 << 30 and s.policy == "budget"
    assert s.model_name() == "ckpt-7" and Settings().model_name() == "default"
    assert Settings(model="/m/a.gguf").model_name() == "a"
    help_text = build_parser().format_help()
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text and "SOFT_" + name.upper() in help_text
    with pytest.raises(SystemExit):
        parse_settings(["--port", "-3"])


def test_path_spec_for_checkpoint_dir(tmp_path: Path) -> None:
    assert Settings(model=str(tmp_path / "run" / "final")).model_name() == "final"


def test_strict_budget_mode_and_slo_headers(client: tuple[TestClient, FakeEngine]) -> None:
    c, fake = client
    ids = [5] * 10  # depth 4: first token 2 ms, 10 ms/token; depth 2: 1 ms, 5 ms/token
    strict = {"x-latency-budget-mode": "strict"}
    r = complete(c, prompt=ids, max_tokens=10, headers={"x-latency-budget": "1ms", **strict})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-latency-budget"
    assert "no exit meets" in r.json()["error"]["message"]
    r = complete(c, prompt=ids, max_tokens=10, headers={"x-latency-budget": "80ms", **strict})
    assert r.status_code == 200 and r.headers["x-soft-depth"] == "2"
    slos = [({"x-slo-tpot-ms": "7"}, 2), ({"x-slo-tpot-ms": "12"}, 4),
            ({"x-slo-ttft-ms": "1.5"}, 2), ({"x-slo-ttft-ms": "1s"}, 4)]  # fmt: skip
    for headers, depth in slos:
        r = complete(c, prompt=ids, max_tokens=10, headers=headers)
        assert r.status_code == 200 and r.headers["x-soft-depth"] == str(depth), headers
    assert fake.submitted[-1].deadline is None  # a first-token SLO alone: no end-to-end one
    r = complete(c, prompt=ids, max_tokens=10, headers={"x-slo-ttft-ms": "5", "x-slo-tpot-ms": "7"})
    req = fake.submitted[-1]
    assert r.headers["x-soft-depth"] == "2" and req.deadline is not None
    assert req.deadline - req.arrival == pytest.approx((5 + 10 * 7) / 1000)
    for name, bad in [("x-slo-ttft-ms", "soon"), ("x-slo-tpot-ms", "-1"),
                      ("x-latency-budget-mode", "lenient")]:  # fmt: skip
        r = complete(c, headers={name: bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == name
    metrics = c.get("/metrics").text
    assert 'soft_latency_budget_depth_total{depth="2",outcome="met"}' in metrics
    assert "soft_depth_cap 4.0" in metrics
