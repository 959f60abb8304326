"""The playground over a scripted engine: the page and its files, GET /v1/soft/plan (each
exit's prediction, the exit a budget gets, nothing counted), GET /v1/soft/stats (per-depth
totals, the depth cap), and the API key on both. The browser drives the page in
tests/http/test_playground_browser.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

import models
from tests.fakes import PROFILE, FakeEngine, make_served_checkpoint
from tests.http.test_api import complete, make_client, wait_ready


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = make_served_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", profile=PROFILE)
    return models.load(path)


def open_client(model: Any, **kw: Any) -> Iterator[tuple[TestClient, FakeEngine]]:
    c, fake = make_client(model, **kw)
    with c:
        wait_ready(c)
        yield c, fake


@pytest.fixture
def client(tiny_model: Any) -> Iterator[tuple[TestClient, FakeEngine]]:
    yield from open_client(tiny_model)


def plan(c: TestClient, **params: Any) -> Any:
    r = c.get("/v1/soft/plan", params=params)
    assert r.status_code == 200, r.text
    return r.json()


# -- the page ---------------------------------------------------------------------------------
def test_page_and_its_files_are_served_without_external_urls(
    client: tuple[TestClient, FakeEngine],
) -> None:
    c, _ = client
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["cache-control"] == "no-cache"
    html = r.text
    assert '<script src="/static/playground.js">' in html
    assert 'href="/static/playground.css"' in html
    for name, kind in [("playground.js", "text/javascript"), ("playground.css", "text/css")]:
        f = c.get(f"/static/{name}")
        assert f.status_code == 200 and f.headers["content-type"].startswith(kind)
        # offline machines: nothing is loaded from another host (no CDN)
        assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", f.text)
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html)
    missing = c.get("/static/../app.py")
    assert missing.status_code == 404
    assert c.get("/static/app.py").json()["error"]["type"] == "not_found_error"


# -- GET /v1/soft/plan ------------------------------------------------------------------------
def test_plan_predicts_every_exit_and_the_exit_a_budget_gets(
    client: tuple[TestClient, FakeEngine],
) -> None:
    c, _ = client
    # PROFILE: depth 2 = 0.1 ms per prompt token + 5 ms per step, depth 4 = 0.2 + 10
    body = plan(c, max_tokens=10, prompt_tokens=20, budget="80ms")
    assert body["object"] == "soft.plan" and body["model"] == "tiny"
    assert (body["policy"], body["default_depth"], body["depth_cap"]) == ("budget", 4, 4)
    assert (body["prompt_tokens"], body["max_tokens"], body["budget_ms"]) == (20, 10, 80.0)
    assert body["exits"] == [
        {"depth": 2, "predicted_ms": pytest.approx(52.0), "ttft_ms": pytest.approx(2.0),
         "tpot_ms": 5.0, "queue_ms": 0.0, "fits": True},
        {"depth": 4, "predicted_ms": pytest.approx(104.0), "ttft_ms": pytest.approx(4.0),
         "tpot_ms": 10.0, "queue_ms": 0.0, "fits": False},
    ]  # fmt: skip
    assert (body["depth"], body["feasible"]) == (2, True)
    # the slider's other positions: the deepest once it fits, the shallowest when none does
    assert (plan(c, max_tokens=10, prompt_tokens=20, budget="1s")["depth"]) == 4
    tight = plan(c, max_tokens=10, prompt_tokens=20, budget="10")
    assert (tight["depth"], tight["feasible"]) == (2, False)
    assert [x["fits"] for x in tight["exits"]] == [False, False]
    free = plan(c, max_tokens=10, prompt_tokens=20)  # no budget: the default depth
    assert (free["depth"], free["budget_ms"], free["exits"][0]["fits"]) == (4, None, None)


def test_plan_agrees_with_the_depth_a_request_gets_and_counts_nothing(
    client: tuple[TestClient, FakeEngine],
) -> None:
    c, _ = client
    policy = c.app.state.soft.serving.policy  # type: ignore[attr-defined]
    for _ in range(5):
        plan(c, max_tokens=10, prompt_tokens=2, budget="80ms")
    assert policy.predictor.arrival_rate() == 0.0  # polling is not load
    for budget in ("80ms", "1s", "1ms"):
        planned = plan(c, max_tokens=10, prompt_tokens=2, budget=budget)["depth"]
        r = complete(c, headers={"x-latency-budget": budget}, max_tokens=10, prompt="Hi")
        assert r.status_code == 200 and int(r.headers["x-soft-depth"]) == planned


def test_plan_refuses_bad_values_with_400(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    for params, param in [
        ({"budget": "fast"}, "budget"),
        ({"budget": "0ms"}, "budget"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"prompt_tokens": 0}, "prompt_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),  # past the 256-token context window
    ]:
        r = c.get("/v1/soft/plan", params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"]["param"] == param, r.json()
    assert "context window is 256 tokens" in c.get("/v1/soft/plan?max_tokens=10000").text


def test_plan_under_the_fixed_policy_ignores_budgets(tiny_model: Any) -> None:
    for c, _ in open_client(tiny_model, policy="fixed"):
        body = plan(c, max_tokens=10, prompt_tokens=20, budget="1ms")
        assert (body["policy"], body["depth"], body["feasible"]) == ("fixed", 4, True)
        assert [x["fits"] for x in body["exits"]] == [False, False]


def test_plan_and_stats_are_503_while_loading() -> None:
    import threading

    from server.http.app import create_app
    from server.settings import Settings

    release = threading.Event()

    def never(_: Settings) -> Any:
        release.wait(5)
        raise ValueError("not this time")

    with TestClient(create_app(Settings(model="tiny"), loader=never)) as c:
        for path in ("/v1/soft/plan", "/v1/soft/stats"):
            r = c.get(path)
            assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        assert c.get("/").status_code == 200  # the page says "loading" itself
        release.set()


# -- GET /v1/soft/stats -----------------------------------------------------------------------
def test_stats_totals_per_depth_and_the_cap(client: tuple[TestClient, FakeEngine]) -> None:
    c, _ = client
    empty = c.get("/v1/soft/stats").json()
    assert empty["object"] == "soft.stats" and empty["model"] == "tiny"
    assert (empty["policy"], empty["default_depth"], empty["depth_cap"]) == ("budget", 4, 4)
    assert (empty["running"], empty["waiting"], empty["kv_cache_usage_ratio"]) == (0, 0, 0.0)
    assert empty["decode_step_ms"] == pytest.approx(1.0)  # FakeEngine's 1 ms step
    assert [(x["depth"], x["requests"], x["generated_tokens"]) for x in empty["depths"]] == [
        (2, 0, 0),
        (4, 0, 0),
    ]
    for model in ("tiny@2", "tiny@2", "tiny@4"):
        assert complete(c, model=model, max_tokens=3, ignore_eos=True).status_code == 200
    body = c.get("/v1/soft/stats").json()
    by_depth = {x["depth"]: x for x in body["depths"]}
    assert [(d, x["requests"], x["ttft_count"], x["generated_tokens"], x["running"])
            for d, x in by_depth.items()] == [(2, 2, 2, 6, 0), (4, 1, 1, 3, 0)]  # fmt: skip
    for x in by_depth.values():
        assert 0 < x["ttft_seconds_sum"] <= x["latency_seconds_sum"]


def test_stats_show_the_governor_cap_under_load_policy(tiny_model: Any) -> None:
    for c, _ in open_client(tiny_model, policy="load"):
        body = c.get("/v1/soft/stats").json()
        assert (body["policy"], body["depth_cap"]) == ("load", 4)
        governor = c.app.state.soft.serving.policy.governor  # type: ignore[attr-defined]
        governor.index = 0  # as an overload would leave it
        assert c.get("/v1/soft/stats").json()["depth_cap"] == 2
        capped = plan(c, max_tokens=10, prompt_tokens=20)
        assert (capped["depth_cap"], capped["depth"]) == (2, 2)  # unbudgeted: the cap


# -- the API key ------------------------------------------------------------------------------
def test_plan_and_stats_need_the_api_key_the_page_does_not(tiny_model: Any) -> None:
    for c, _ in open_client(tiny_model, settings={"api_key": "s3cret"}):
        for path in ("/v1/soft/plan", "/v1/soft/stats"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert c.get(path, headers={"authorization": "Bearer wrong"}).status_code == 401
            ok = c.get(path, headers={"authorization": "Bearer s3cret"})
            assert ok.status_code == 200, ok.text
        assert c.get("/").status_code == 200 and c.get("/static/playground.js").status_code == 200
