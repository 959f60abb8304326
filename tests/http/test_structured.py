"""Structured outputs over HTTP, on the real engine and a tiny random checkpoint: every
request form (OpenAI's response_format, vLLM's structured_outputs and guided_*), the
OpenAI SDK's `parse()`, every exit, and the 400s for what does not compile."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from server.http.app import create_app
from server.serving.protocol import ChatCompletionRequest, StructuredSpec
from server.serving.structured import MAX_SOURCE_CHARS
from server.settings import Settings
from tests.fakes import PROFILE, make_served_checkpoint
from tests.http.test_api import wait_ready

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Rome", "Zürich"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Ada is 36 and lives in Paris. Extract her."}]


def app_client(tmp_path_factory: pytest.TempPathFactory, **settings: Any) -> TestClient:
    ckpt = make_served_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", profile=PROFILE)
    s = Settings(model=str(ckpt), kv_cache_memory="8MiB", quantization="none", **settings)
    return TestClient(create_app(s), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with app_client(tmp_path_factory, served_model_name="tiny", grammar_timeout=2.0) as c:
        wait_ready(c)
        yield c


def chat(c: TestClient, **body: Any) -> Any:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 96, **body}
    return c.post("/v1/chat/completions", json=body)


def content(r: Any) -> str:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    return str(choice.get("message", {}).get("content", choice.get("text")))


# -- the request forms, read ------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, kind, param",
    [
        ({"response_format": {"type": "json_object"}}, "json", "response_format"),
        (
            {"response_format": {"type": "json_schema",
                                 "json_schema": {"name": "p", "schema": PERSON, "strict": True}}},
            "json",
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"json": PERSON}}, "json", "structured_outputs.json"),
        ({"structured_outputs": {"regex": "[0-9]+"}}, "regex", "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["a", "b"]}}, "choice", "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": 'root ::= "x"'}}, "grammar",
         "structured_outputs.grammar"),
        ({"guided_json": json.dumps(PERSON)}, "json", "guided_json"),
        ({"guided_regex": "[0-9]+"}, "regex", "guided_regex"),
        ({"guided_choice": ["a", "b"]}, "choice", "guided_choice"),
        ({"guided_grammar": 'root ::= "x"'}, "grammar", "guided_grammar"),
    ],
)  # fmt: skip
def test_each_form_reads_as_one_spec(extra: dict[str, Any], kind: str, param: str) -> None:
    req = ChatCompletionRequest.model_validate({"messages": MESSAGES, **extra})
    spec = req.structured()
    assert spec is not None and (spec.kind, spec.param) == (kind, param)
    assert req.unsupported() is None
    if kind == "json" and "PERSON" not in param:
        assert json.loads(spec.source) in (PERSON, {"type": "object"})


def test_text_is_no_constraint_and_the_schema_keeps_its_key_order() -> None:
    assert (
        ChatCompletionRequest(messages=MESSAGES, response_format={"type": "text"}).structured()
        is None
    )  # type: ignore[arg-type]  # noqa: E501
    spec = StructuredSpec.schema({"z": 1, "a": 2}, "p")
    assert spec.source == '{"z": 1, "a": 2}'


# -- end to end ---------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny", "tiny@2", "tiny@4"])
def test_json_schema_is_valid_at_every_exit(client: TestClient, model: str) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(3):
        r = chat(client, model=model, response_format=rf, temperature=1.0, seed=seed)
        jsonschema.validate(json.loads(content(r)), PERSON)
        assert r.headers["x-soft-depth"] == (model.split("@")[1] if "@" in model else "4")


def test_json_object_is_an_object_on_both_endpoints(client: TestClient) -> None:
    r = chat(client, response_format={"type": "json_object"}, max_tokens=200, temperature=0)
    assert r.status_code == 200, r.text
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content(r)), dict)
    else:  # a random model may keep writing one object: what it wrote is a prefix of one
        assert r.json()["choices"][0]["message"]["content"].startswith("{")
    body = {"model": "tiny", "prompt": "JSON:", "max_tokens": 64, "n": 2, "seed": 1,
            "guided_json": PERSON}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), PERSON)


@pytest.mark.parametrize(
    "extra, check",
    [
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"structured_outputs": {"regex": r"[0-9]{3}-[a-c]{2}"}},
         lambda t: re.fullmatch(r"[0-9]{3}-[a-c]{2}", t)),
        ({"guided_regex": r"(cat|dog)s?"}, lambda t: re.fullmatch(r"(cat|dog)s?", t)),
        ({"structured_outputs": {"grammar": 'root ::= "x" ("y" | "z")'}},
         lambda t: t in ("xy", "xz")),
        ({"guided_grammar": 'root ::= [0-9] "+" [0-9]'}, lambda t: re.fullmatch(r"\d\+\d", t)),
    ],
)  # fmt: skip
def test_regex_choice_and_grammar_forms(
    client: TestClient, extra: dict[str, Any], check: Any
) -> None:  # noqa: E501
    for seed in range(2):
        assert check(content(chat(client, temperature=1.0, seed=seed, **extra)))


def test_streamed_output_is_valid(client: TestClient) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 64, "stream": True,
            "guided_json": PERSON}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    chunks = [json.loads(x) for x in lines if x != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    jsonschema.validate(json.loads(text), PERSON)


def test_openai_sdk_parse_round_trip_at_every_exit(client: TestClient) -> None:
    openai = pytest.importorskip("openai")
    from typing import Literal

    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=120)
        city: Literal["Paris", "Rome"]

    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client,
                        max_retries=0)  # fmt: skip
    for model in ("tiny@2", "tiny@4"):
        done = sdk.chat.completions.parse(
            model=model, messages=MESSAGES, response_format=Person, max_tokens=96, seed=3
        )
        person = done.choices[0].message.parsed
        assert isinstance(person, Person) and person.city in ("Paris", "Rome")


# -- what does not compile ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "nope"}}}}, "response_format.json_schema.schema"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
        ({"structured_outputs": {"json": {"type": "string", "pattern": "(["}}},
         "structured_outputs.json"),
    ],
)  # fmt: skip
def test_what_does_not_compile_is_400_naming_the_field(
    client: TestClient, extra: dict[str, Any], param: str
) -> None:
    for _ in range(2):  # the second from the cache of refusals
        r = chat(client, **extra)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error"
        assert param in err["message"]


def test_a_huge_schema_is_400_at_once(client: TestClient,
                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from server.serving import structured

    def never(self: Any, spec: Any) -> Any:
        raise AssertionError("a schema over the size limit was compiled")

    monkeypatch.setattr(structured.Grammars, "_compile_source", never)
    big = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(900)}}
    assert len(json.dumps(big)) > MAX_SOURCE_CHARS
    r = chat(client, guided_json=big)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json"
    assert "at most" in r.json()["error"]["message"]


def test_a_slow_compile_is_400_and_health_answers_meanwhile(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compile that outlives --grammar-timeout is a 400 (and remembered as refused),
    while /health and other requests are served. The slow compile is made deterministic:
    it blocks until the test lets it go, however fast the machine."""
    from server.serving import structured

    release, entered = threading.Event(), threading.Event()
    real = structured.Grammars._compile_source
    slow = {"type": "object", "properties": {"slow": {"type": "string"}}}

    def blocking(self: Any, spec: Any) -> Any:
        if '"slow"' in spec.source:
            entered.set()
            release.wait(30)
        return real(self, spec)

    monkeypatch.setattr(structured.Grammars, "_compile_source", blocking)
    with app_client(tmp_path_factory, grammar_timeout=0.2) as c:
        wait_ready(c)
        result: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: result.update(r=chat(c, guided_json=slow)))
        worker.start()
        assert entered.wait(30)
        health = []
        while worker.is_alive():  # the event loop answers while the compile runs
            health.append(c.get("/health").status_code)
        worker.join()
        r = result["r"]
        assert r.status_code == 400, r.text
        assert "took over 0.2s" in r.json()["error"]["message"]
        assert health and set(health) == {200}
        # the same schema again: refused from the cache, no second compile
        again = chat(c, guided_json=slow)
        assert again.status_code == 400 and "took over 0.2s" in again.json()["error"]["message"]
        # the next request is served while that compile is still held on its thread
        r = chat(c, guided_choice=["a", "b"])
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in "ab"
        release.set()


def test_the_openapi_document_describes_the_fields(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    chat_fields = schemas["ChatCompletionRequest"]["properties"]
    for name in ("response_format", "structured_outputs", "guided_json", "guided_regex",
                 "guided_choice", "guided_grammar"):  # fmt: skip
        assert name in chat_fields and name in schemas["CompletionRequest"]["properties"]
    assert schemas["ResponseFormat"]["properties"]["type"]["enum"] == [
        "text", "json_object", "json_schema"
    ]  # fmt: skip
    assert "schema" in schemas["JsonSchemaFormat"]["properties"]
    assert {"json", "regex", "choice", "grammar"} <= set(schemas["StructuredOutputs"]["properties"])
