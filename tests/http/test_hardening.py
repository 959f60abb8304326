"""What real clients and a fuzzer found (issue 20), each as the request that found it:
lone surrogates, request chat templates, requests larger than the queue, sampling fields,
the budget of a chat request without max_tokens, depth model cards through the SDK,
logprobs that line up with the text, rejections in the metrics, llm-d's SLO headers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeEngine
from tests.http.test_api import (  # noqa: F401  (tiny_model is a fixture)
    client,
    complete,
    make_client,
    scripted,
    sse_events,
    tiny_model,
    wait_ready,
)


def post(c: TestClient, path: str, body: dict[str, Any], **headers: str) -> Any:
    """POST with the body as ASCII JSON (json.dumps escapes a lone surrogate as \\ud800,
    which is what a JavaScript client sends)."""
    return c.post(
        path,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
    )


def chat(c: TestClient, headers: dict[str, str] | None = None, **body: Any) -> Any:
    body.setdefault("messages", [{"role": "user", "content": "Say hi"}])
    return post(c, "/v1/chat/completions", body, **(headers or {}))


def rejected(c: TestClient) -> dict[str, float]:
    fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    return {
        s.labels["reason"]: s.value
        for s in fams["soft_requests_rejected"].samples
        if s.name.endswith("_total")
    }


@pytest.fixture
def quick(tiny_model: Any) -> Iterator[tuple[TestClient, FakeEngine]]:  # noqa: F811
    c, fake = make_client(tiny_model)
    with c:
        wait_ready(c)
        yield c, fake


# -- 1. lone UTF-16 surrogates --------------------------------------------------------------
def test_lone_surrogates_become_replacement_characters(
    quick: tuple[TestClient, FakeEngine],
) -> None:
    c, fake = quick
    bad = "abc \ud800 def"
    r = post(c, "/v1/completions", {"prompt": bad, "max_tokens": 3, "echo": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith("abc \ufffd def")
    r = post(c, "/v1/completions", {"prompt": [bad, "ok \udfff"], "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    r = post(c, "/v1/completions", {"prompt": bad, "max_tokens": 3, "stream": True,
                                    "echo": True, "logprobs": 1, "stop": ["\udc00x"]})  # fmt: skip
    assert r.status_code == 200 and sse_events(r.text)[-1] == "[DONE]"
    assert sse_events(r.text)[0]["choices"][0]["text"].startswith("abc \ufffd def")
    parts = [{"type": "text", "text": "x \ud83d"}, {"type": "text", "text": "\ude42 y"}]
    for content in (bad, parts):
        r = chat(c, messages=[{"role": "user", "content": content}], max_tokens=2)
        assert r.status_code == 200, r.text
        r = chat(c, messages=[{"role": "user", "content": content}], max_tokens=2, stream=True)
        assert r.status_code == 200 and sse_events(r.text)[-1] == "[DONE]"
    # a pair split over two strings stays two halves (U+FFFD each); a pair in one is joined
    r = post(c, "/v1/completions", {"prompt": "\ud83d\ude42", "max_tokens": 1, "echo": True})
    assert r.json()["choices"][0]["text"].startswith("🙂")
    r = post(c, "/v1/completions", {"model": "tiny\ud800", "prompt": "x"})
    assert r.status_code == 404  # not a 500: the name is echoed back safely


# -- 2. a chat template from the request -----------------------------------------------------
SLOW = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}hi"


def test_request_chat_template_needs_the_operators_flag(
    quick: tuple[TestClient, FakeEngine],
) -> None:
    c, fake = quick
    for body in ({"chat_template_kwargs": {"chat_template": "hi"}}, {"chat_template": "hi"}):
        r = chat(c, max_tokens=2, **body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "chat_template" and "--trust-request-chat-template" in err["message"]
    before = len(fake.submitted)
    r = chat(c, max_tokens=2, chat_template_kwargs={"enable_thinking": False})
    assert r.status_code == 200 and len(fake.submitted) == before + 1  # other kwargs still pass


def test_a_slow_trusted_template_is_stopped_and_never_blocks_health(tiny_model: Any) -> None:  # noqa: F811
    settings = {"trust_request_chat_template": True, "text_timeout": 2.0}
    c, fake = make_client(tiny_model, settings=settings)
    with c:
        wait_ready(c)
        r = chat(c, max_tokens=2, chat_template="{{ messages[0]['content'] }} and more")
        assert r.status_code == 200, r.text  # a trusted template renders
        assert fake.submitted[-1].prompt_ids == tuple(
            tiny_model.tokenizer("Say hi and more", add_special_tokens=False)["input_ids"]
        )
        result: dict[str, Any] = {}

        def slow() -> None:
            t0 = time.monotonic()
            result["r"] = chat(c, max_tokens=2, chat_template_kwargs={"chat_template": SLOW})
            result["s"] = time.monotonic() - t0

        worker = threading.Thread(target=slow)
        worker.start()
        time.sleep(0.2)  # the template is rendering now
        worst = 0.0
        while worker.is_alive():
            t0 = time.monotonic()
            assert c.get("/health").status_code == 200
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.05)
        worker.join()
        assert worst < 0.5, f"/health took {worst:.2f}s while a template rendered"
        r = result["r"]
        assert r.status_code == 400 and "took over 2s" in r.json()["error"]["message"]
        assert result["s"] < 6.0  # stopped at its deadline, not after 10^10 iterations
        big = "x" * (64 * 1024 + 1)
        r = chat(c, max_tokens=2, chat_template=big)
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
        assert c.get("/health").status_code == 200


# -- 3. a request larger than the queue -------------------------------------------------------
def test_more_sequences_than_the_queue_admits_is_400_not_429(tiny_model: Any) -> None:  # noqa: F811
    c, fake = make_client(tiny_model, settings={"max_queue": 8}, max_queue=8)
    with c:
        wait_ready(c)
        r = complete(c, n=9)
        assert r.status_code == 400 and "retry-after" not in r.headers
        err = r.json()["error"]
        assert err["param"] == "n" and "--max-queue" in err["message"] and "8" in err["message"]
        r = complete(c, prompt=["a"] * 9)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert chat(c, n=9, max_tokens=2).status_code == 400
        assert fake.submitted == []  # nothing reached the engine
        assert complete(c, n=8).status_code == 200  # what fits is served when alone


# -- 4. sampling fields ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        {"logit_bias": {"abc": 1}},
        {"logit_bias": {"99999999": 1}},
        {"logit_bias": {"384": 1}},  # the tiny vocabulary is 384
        {"logit_bias": {"5": 101}},
        {"logit_bias": {"-5": 1}},
        {"frequency_penalty": 2.5},
        {"presence_penalty": -3},
        {"repetition_penalty": 0},
    ],
)
def test_invalid_penalties_and_biases_are_400(
    quick: tuple[TestClient, FakeEngine], body: dict[str, Any]
) -> None:
    c, _ = quick
    r = complete(c, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == next(iter(body))


def test_penalties_and_biases_reach_the_engine(quick: tuple[TestClient, FakeEngine]) -> None:
    c, fake = quick
    r = complete(c, logit_bias={"5": -100, "7": 2.5}, frequency_penalty=0.5,
                 presence_penalty=-1.0, repetition_penalty=1.2)  # fmt: skip
    assert r.status_code == 200, r.text
    p = fake.submitted[-1].params
    assert p.logit_bias == ((5, -100.0), (7, 2.5))
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2)
    assert chat(c, max_tokens=2, presence_penalty=2).status_code == 200
    assert fake.submitted[-1].params.presence_penalty == 2.0


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"best_of": 2}, "best_of"),
        ("/v1/completions", {"suffix": "the end"}, "suffix"),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_object"}, "guided_regex": "a+"},
            "guided_regex",
        ),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_unsupported_fields_are_400_naming_the_param(
    quick: tuple[TestClient, FakeEngine], path: str, body: dict[str, Any], param: str
) -> None:
    c, fake = quick
    body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], **body}
    r = post(c, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "unsupported_parameter"
    assert "not supported" in err["message"]
    ok = {"best_of": 1, "suffix": "", "response_format": {"type": "text"}, "tool_choice": "none"}
    assert complete(c, **ok).status_code == 200  # the values that change nothing pass


# -- 5. the budget of a chat request without max_tokens -----------------------------------------
def test_budget_without_max_tokens_predicts_a_learnt_output_length(tiny_model: Any) -> None:  # noqa: F811
    eos = tiny_model.tokenizer.eos_token_id
    c, fake = make_client(tiny_model, script=scripted([40, 41, eos]))
    with c:
        wait_ready(c)
        budget = {"x-latency-budget": "10s"}
        r = chat(c, headers=budget)
        assert r.status_code == 200, r.text
        prompt_len = len(fake.submitted[-1].prompt_ids)
        assert fake.submitted[-1].params.max_tokens == 256 - prompt_len  # may run to the end
        # the prior (256 tokens, capped by the context) at depth 4: 10 ms a token, not the
        # whole context window
        first = r.json()["soft"]["predicted_ms"]
        assert first == pytest.approx(0.2 * prompt_len + (256 - prompt_len) * 10.0, rel=0.01)
        for _ in range(16):  # outputs of 3 tokens teach the estimate
            chat(c, headers=budget)
        learnt = chat(c, headers=budget).json()["soft"]["predicted_ms"]
        # the same prompt again: its whole blocks are cached, only the rest is prefilled
        uncached = prompt_len - (prompt_len - 1) // fake.block_size * fake.block_size
        assert learnt == pytest.approx(0.2 * uncached + 3 * 10.0, rel=0.01)
        # a budget the learnt length fits at full depth is no longer "infeasible"
        r = chat(c, headers={"x-latency-budget": "100ms"})
        assert r.headers["x-soft-depth"] == "4"


# -- 6. model cards by id, through the OpenAI SDK ------------------------------------------------
def test_openai_sdk_retrieves_depth_model_cards(quick: tuple[TestClient, FakeEngine]) -> None:
    import openai

    c, _ = quick
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=c)
    card = sdk.models.retrieve("tiny@2")
    assert (card.id, card.owned_by) == ("tiny@2", "soft-serve")
    assert sdk.models.retrieve("tiny").id == "tiny"
    assert [m.id for m in sdk.models.list()] == ["tiny", "tiny@2", "tiny@4"]
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("tiny@3")
    out = sdk.completions.create(model="tiny@2", prompt="Hello", max_tokens=2)
    assert out.model == "tiny@2"


# -- 8. logprobs that line up with the text -----------------------------------------------------
def test_chat_logprobs_hold_no_eos_entry(tiny_model: Any) -> None:  # noqa: F811
    tok = tiny_model.tokenizer
    ids = tok("Hi there")["input_ids"]
    c, _ = make_client(tiny_model, script=scripted([*ids, tok.eos_token_id]))
    with c:
        wait_ready(c)
        body = chat(c, max_tokens=10, logprobs=True, top_logprobs=1).json()
        (choice,) = body["choices"]
        tokens = [e["token"] for e in choice["logprobs"]["content"]]
        assert choice["message"]["content"] == "Hi there" and "<|im_end|>" not in tokens
        assert len(tokens) == len(ids)
        # usage counts the EOS token the model generated, as vLLM does
        assert body["usage"]["completion_tokens"] == len(ids) + 1
        r = chat(c, max_tokens=10, logprobs=True, stream=True)
        entries = [e for ev in sse_events(r.text)[:-1] for ch in ev["choices"]
                   for e in (ch.get("logprobs") or {}).get("content") or []]  # fmt: skip
        assert [e["token"] for e in entries] == tokens
        # completions keep one entry per generated token (lm-evaluation-harness counts them)
        lp = complete(c, max_tokens=10, logprobs=0).json()["choices"][0]["logprobs"]
        assert lp["tokens"][-1] == "<|im_end|>" and len(lp["tokens"]) == len(ids) + 1
        assert lp["text_offset"][-1] == len("Hi there")


def test_stop_string_truncates_the_logprobs(tiny_model: Any) -> None:  # noqa: F811
    tok = tiny_model.tokenizer
    ids = tok("Paris is nice. The capital of Italy is Rome.")["input_ids"]
    c, _ = make_client(tiny_model, script=scripted(ids))
    with c:
        wait_ready(c)
        ch = complete(c, max_tokens=len(ids), stop=" capital", logprobs=0).json()["choices"][0]
        lp = ch["logprobs"]
        assert ch["text"] == "Paris is nice. The"
        assert "".join(lp["tokens"]) == ch["text"]
        assert [ch["text"][o:] for o in lp["text_offset"]][0] == ch["text"]
        assert all(o < len(ch["text"]) for o in lp["text_offset"])
        content = chat(c, max_tokens=len(ids), stop=" capital", logprobs=True).json()
        tokens = [e["token"] for e in content["choices"][0]["logprobs"]["content"]]
        assert "".join(tokens) == "Paris is nice. The"
        for kind in ("completion", "chat"):
            if kind == "completion":
                r = complete(c, max_tokens=len(ids), stop=" capital", logprobs=0, stream=True)
                got = [t for ev in sse_events(r.text)[:-1] for t in
                       ((ev["choices"][0]["logprobs"] or {}).get("tokens") or [])]  # fmt: skip
            else:
                r = chat(c, max_tokens=len(ids), stop=" capital", logprobs=True, stream=True)
                got = [e["token"] for ev in sse_events(r.text)[:-1] for e in
                       ((ev["choices"][0].get("logprobs") or {}).get("content") or [])]  # fmt: skip
            assert "".join(got) == "Paris is nice. The", kind


def test_streamed_echo_sends_prompt_logprobs_with_the_prompt_text(
    quick: tuple[TestClient, FakeEngine],
) -> None:
    c, _ = quick
    r = complete(c, prompt="Hello there", max_tokens=3, echo=True, logprobs=1, stream=True)
    events = sse_events(r.text)[:-1]
    for ev in events:
        (ch,) = ev["choices"]
        if ch["logprobs"] is not None and ch["logprobs"]["tokens"]:
            assert ch["text"], f"logprobs in an empty-text chunk: {ev}"
    first = events[0]["choices"][0]
    assert first["text"].startswith("Hello there")
    assert first["logprobs"]["token_logprobs"][0] is None  # the prompt's first token
    # without logprobs the echo still opens the stream
    r = complete(c, prompt="Hello there", max_tokens=3, echo=True, stream=True)
    assert sse_events(r.text)[0]["choices"][0]["text"] == "Hello there"


def test_multibyte_echo_offsets_count_characters(quick: tuple[TestClient, FakeEngine]) -> None:
    c, _ = quick
    text = "café 日本語 🙂!"
    r = complete(c, prompt=text, max_tokens=0, echo=True, logprobs=0)
    ch = r.json()["choices"][0]
    lp = ch["logprobs"]
    assert ch["text"] == text
    assert "".join(lp["tokens"]) == text and not any("\ufffd" in t for t in lp["tokens"])
    ends = lp["text_offset"][1:] + [len(text)]
    assert [text[a:b] for a, b in zip(lp["text_offset"], ends, strict=True)] == lp["tokens"]
    assert lp["text_offset"][-1] < len(text) == 11


def test_multibyte_generated_offsets_line_up(tiny_model: Any) -> None:  # noqa: F811
    tok = tiny_model.tokenizer
    text = "Zürich 東京 🙂!"
    c, _ = make_client(tiny_model, script=scripted(tok(text)["input_ids"]))
    with c:
        wait_ready(c)
        ch = complete(c, prompt="x", max_tokens=30, logprobs=0, echo=True).json()["choices"][0]
        lp = ch["logprobs"]
        assert ch["text"] == "x" + text
        assert "".join(lp["tokens"]) == ch["text"]
        assert all(ch["text"][o:].startswith(t) for t, o in zip(lp["tokens"], lp["text_offset"],
                                                                  strict=True))  # fmt: skip


# -- 9. rejections in the metrics ----------------------------------------------------------------
def test_rejections_are_counted_by_reason(tiny_model: Any) -> None:  # noqa: F811
    settings = {"api_key": "k", "max_body_bytes": 2000, "max_queue": 2}
    c, fake = make_client(tiny_model, settings=settings, max_queue=2, token_delay=0.05)
    auth = {"authorization": "Bearer k"}
    with c:
        wait_ready(c)
        reasons = ("bad_request", "unauthorized", "not_found", "too_large", "queue_full")
        assert rejected(c) == {r: 0.0 for r in (*reasons, "unavailable")}
        assert complete(c).status_code == 401
        assert complete(c, headers=auth, prompt="x" * 3000).status_code == 413
        assert complete(c, headers=auth, temperature=9).status_code == 400  # validation
        assert complete(c, headers=auth, n=3).status_code == 400  # over --max-queue
        assert complete(c, headers=auth, model="nope").status_code == 404
        busy = threading.Thread(target=lambda: complete(c, headers=auth, n=2, max_tokens=20))
        busy.start()
        for _ in range(100):
            if len(fake.active) == 2:
                break
            time.sleep(0.01)
        r = complete(c, headers=auth)
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        busy.join()
        got = rejected(c)
    assert got == {"bad_request": 2.0, "unauthorized": 1.0, "not_found": 1.0, "too_large": 1.0,
                   "queue_full": 1.0, "unavailable": 0.0}  # fmt: skip


# -- 10. llm-d's SLO header names ------------------------------------------------------------------
def test_llm_d_slo_headers_are_aliases(quick: tuple[TestClient, FakeEngine]) -> None:
    c, fake = quick
    ids = [5] * 10  # depth 4: first token 2 ms, 10 ms/token; depth 2: 1 ms, 5 ms/token
    tpot, ttft = "x-llm-d-slo-tpot-ms", "x-llm-d-slo-ttft-ms"
    for headers, depth in [({tpot: "7"}, 2), ({tpot: "12"}, 4), ({ttft: "1.5"}, 2),
                           ({ttft: "1s"}, 4)]:  # fmt: skip
        r = complete(c, prompt=ids, max_tokens=10, headers=headers)
        assert r.status_code == 200 and r.headers["x-soft-depth"] == str(depth), headers
    r = complete(c, prompt=ids, max_tokens=10,
                 headers={"x-llm-d-slo-ttft-ms": "5", "x-llm-d-slo-tpot-ms": "7"})  # fmt: skip
    req = fake.submitted[-1]
    assert req.deadline is not None
    assert req.deadline - req.arrival == pytest.approx((5 + 10 * 7) / 1000)
    r = complete(c, headers={"x-llm-d-slo-tpot-ms": "soon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-llm-d-slo-tpot-ms"
    # both names: x-slo-* wins, but a malformed alias is still refused (the fuzzer's find)
    r = complete(c, headers={"x-slo-ttft-ms": "5", "x-llm-d-slo-ttft-ms": "]2"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-llm-d-slo-ttft-ms"


# -- 7. the OpenAPI document ---------------------------------------------------------------------
def test_openapi_document_describes_the_server(quick: tuple[TestClient, FakeEngine]) -> None:
    c, _ = quick
    doc = c.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ErrorResponse" in schemas
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path in ("/v1/completions", "/v1/chat/completions"):
        op = doc["paths"][path]["post"]
        assert "422" not in op["responses"]
        for status in ("400", "401", "413", "429", "503"):
            schema = op["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
        assert "Retry-After" in op["responses"]["429"]["headers"]
        ok = op["responses"]["200"]
        assert set(ok["content"]) == {"application/json", "text/event-stream"}
        assert ok["content"]["application/json"]["schema"]["$ref"].endswith("Response")
        assert {"x-soft-depth", "x-soft-predicted-ms"} <= set(ok["headers"])
        names = {p["name"] for p in op["parameters"]}
        assert {"x-latency-budget", "x-soft-depth", "x-slo-ttft-ms", "x-slo-tpot-ms",
                "x-llm-d-slo-ttft-ms", "x-llm-d-slo-tpot-ms"} <= names  # fmt: skip
        assert op["security"] == [{"bearer": []}, {}]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    card = doc["paths"]["/v1/models/{model_id}"]["get"]["responses"]["200"]
    assert card["content"]["application/json"]["schema"]["$ref"].endswith("ModelCard")
    # what the document calls valid the server accepts: 1.0 is an integer, "" no prompt
    assert complete(c, n=1.0, max_tokens=2.0).status_code == 200
    r = complete(c, prompt="")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    prompt = doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert {"type": "string", "minLength": 1} in prompt["anyOf"]


def test_openapi_documents_400_where_a_query_parameter_can_be_bad(
    quick: tuple[TestClient, FakeEngine],
) -> None:
    c, _ = quick
    plan = c.get("/openapi.json").json()["paths"]["/v1/soft/plan"]["get"]
    assert "400" in plan["responses"]
    assert c.get("/v1/soft/plan", params={"budget": ""}).status_code == 400
