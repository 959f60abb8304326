"""deploy/ against the running thing: the real soft-serve (`python -m server`, a tiny random
checkpoint) and the real Prometheus (Debian package) scraping it with deploy/'s rules.

- Every metric the dashboard, the rules and the autoscalers query is one the live server
  exports on /metrics: not just the contract list that tests/test_deploy.py checks offline.
- Prometheus, scraping every second while the server takes a short load at two pinned
  depths, answers a per-depth `histogram_quantile`, every recording rule from rules.yml
  carries data, every dashboard query returns data, and the alert and autoscaler queries
  evaluate without error on real series.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import PROFILE, make_served_checkpoint
from tests.test_deploy import (
    DEPLOY,
    EXPORTED,
    PROMETHEUS_SERIES,
    all_promql,
    grafana_to_promql,
    load_yaml,
    promql_metric_names,
    recorded_names,
    require_tool,
)
from tests.test_server_e2e import Server, free_port, start_server, stop_server

pytestmark = pytest.mark.deploy

DEPTHS = ("2", "4")  # the served checkpoint's exits; the load pins each in turn
JOB = "soft-serve"  # the job name rules.yml's SoftServeDown watches
WAIT_S = 60  # every wait on Prometheus in one test, together
P95_BY_DEPTH = (
    "histogram_quantile(0.95, sum by (le, depth) "
    f'(rate(soft_request_latency_seconds_bucket{{job="{JOB}"}}[30s])))'
)
T = TypeVar("T")


# ---------------------------------------------------------------- helpers


def tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def exported(server: Server) -> set[str]:
    """Sample names on the live /metrics: histograms as _bucket/_sum/_count, counters _total."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def send_load(server: Server, requests: int, spread_s: float) -> None:
    """Small completions alternating between the pinned depths, spread over `spread_s` so
    that several 1 s scrapes see the histograms grow. Each carries a loose latency budget,
    so budget attainment has data too."""
    start = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for i in range(requests):
            depth = DEPTHS[i % len(DEPTHS)]
            body = {"model": f"{server.ckpt.name}@{depth}", "prompt": "Hello", "max_tokens": 4}
            r = client.post("/v1/completions", json=body, headers={"x-latency-budget": "10s"})
            assert r.status_code == 200, f"{r.status_code} {r.text}\n{tail(server.log)}"
            assert r.headers["x-soft-depth"] == depth
            time.sleep(max(0.0, start + spread_s * (i + 1) / requests - time.monotonic()))


def dashboard_queries(node: Any) -> list[str]:
    """Every query a Grafana dashboard runs: panel targets (inside rows too), with template
    variables substituted, and the metric of each label_values() variable."""
    found: list[str] = []
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            found.append(grafana_to_promql(node["expr"]))
        if node.get("type") == "query" and isinstance(node.get("definition"), str):
            found += re.findall(r"label_values\(\s*([^,()]+?)\s*,", node["definition"])
        for value in node.values():
            found += dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            found += dashboard_queries(item)
    return found


def live_promql() -> dict[str, list[str]]:
    """tests/test_deploy.py's PromQL sources, with every dashboard under deploy/grafana."""
    sources = {k: v for k, v in all_promql().items() if k != "dashboard"}
    for path in sorted((DEPLOY / "grafana/dashboards").glob("*.json")):
        sources[f"dashboards/{path.name}"] = dashboard_queries(json.loads(path.read_text()))
    return sources


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; fails the test on a PromQL or evaluation error."""
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{expr!r} failed: {body}"
        return list(body["data"]["result"])


def prometheus_config(target: str, self_target: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml, scraping and evaluating every second, with the
    repo's rules.yml and the live server as the soft-serve job's only target."""
    config = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / f) for f in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert JOB in jobs, f"prometheus.yml has no {JOB} job"
    for name, job in jobs.items():
        job.update(scrape_interval="1s", scrape_timeout="1s")
        for static in job["static_configs"]:
            static["targets"] = [target if name == JOB else self_target]
    return config


def start_prometheus(server: Server, tmp: Path) -> Prometheus:
    binary = require_tool("prometheus", "apt-get install prometheus")
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(prometheus_config(server.url.split("//")[1], f"127.0.0.1:{port}"))
    )
    log = tmp / "prometheus.log"
    cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(prom.url + "/-/ready", timeout=2).status_code == 200:
                return prom
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise AssertionError(f"prometheus did not become ready:\n{tail(log)}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def finite_by_depth(result: list[dict[str, Any]]) -> dict[str, float]:
    """depth -> value of an instant vector, finite values only (NaN: no traffic in range)."""
    values = {r["metric"].get("depth", ""): float(r["value"][1]) for r in result}
    return {d: v for d, v in values.items() if math.isfinite(v)}


def every_depth(found: dict[str, float]) -> bool:
    return set(DEPTHS) <= set(found)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("live")
    srv = start_server(make_served_checkpoint(tmp / "tiny", profile=PROFILE), tmp / "server.log")
    try:
        yield srv
    finally:
        try:
            clean = stop_server(srv)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            clean = False
        assert clean, f"soft-serve did not shut down cleanly:\n{tail(srv.log)}"


# ---------------------------------------------------------------- tests


def test_every_query_names_a_metric_the_live_server_exports(live: Server) -> None:
    # a labelled series (soft_requests_total{depth,finish_reason}) appears with its first request
    send_load(live, requests=len(DEPTHS), spread_s=0)
    names = exported(live)
    assert EXPORTED <= names, f"contract metrics not on /metrics: {sorted(EXPORTED - names)}"
    allowed = names | recorded_names() | PROMETHEUS_SERIES
    unknown = []
    for source, exprs in live_promql().items():
        assert exprs, f"no PromQL found in {source}"
        for expr in exprs:
            used = promql_metric_names(expr)
            assert used, f"{source}: no metric in {expr!r}"
            unknown += [f"{source}: {n} in {expr!r}" for n in sorted(used - allowed)]
    assert not unknown, "queried but not exported by the live server:\n" + "\n".join(unknown)


def test_prometheus_answers_per_depth_quantiles_of_a_live_server(
    live: Server, tmp_path: Path
) -> None:
    prom = start_prometheus(live, tmp_path)
    deadline = time.monotonic() + WAIT_S

    def logs() -> str:
        return f"--- prometheus log ---\n{tail(prom.log)}\n--- soft-serve log ---\n{tail(live.log)}"

    def wait_for(probe: Callable[[], T], what: str, ok: Callable[[T], bool] = bool) -> T:
        last: T | None = None
        while time.monotonic() < deadline:
            last = probe()
            if ok(last):
                return last
            time.sleep(0.5)
        pytest.fail(f"{what} within {WAIT_S}s (last answer: {last!r})\n{logs()}")

    try:
        wait_for(lambda: prom.query(f'up{{job="{JOB}"}} == 1'), f"Prometheus never scraped {JOB}")
        send_load(live, requests=40, spread_s=4)

        quantiles = wait_for(
            lambda: finite_by_depth(prom.query(P95_BY_DEPTH)),
            f"no finite p95 for depths {DEPTHS} from {P95_BY_DEPTH}",
            every_depth,
        )
        assert all(0 < v < 60 for v in quantiles.values()), quantiles

        # the recording rules (rules.yml evaluates them every 15 s)
        record = "depth:soft_request_latency_seconds:p95_5m"
        assert record in recorded_names()
        wait_for(
            lambda: finite_by_depth(prom.query(record)),
            f"recording rule {record} has no finite value for depths {DEPTHS}",
            every_depth,
        )
        ratio = "soft:soft_latency_budget:attainment_ratio_5m"
        attainment = wait_for(
            lambda: finite_by_depth(prom.query(ratio)), f"recording rule {ratio} has no data"
        )
        assert 0 < attainment[""] <= 1, attainment

        # Every recording rule has data, every dashboard panel shows data, and every other
        # query (alerts below their thresholds; KEDA and prometheus-adapter, which select
        # Kubernetes target labels a static scrape lacks) evaluates without error.
        no_data = [r for r in sorted(recorded_names()) if not prom.query(r)]
        assert not no_data, f"recording rules without data: {no_data}"
        for source, exprs in live_promql().items():
            for expr in exprs:
                result = prom.query(expr)
                if source.startswith("dashboards/"):
                    assert result, f"{source}: no data for {expr!r}"
    except (AssertionError, httpx.HTTPError) as err:
        raise AssertionError(f"{err}\n{logs()}") from err
    finally:
        stop(prom.proc)
    assert prom.proc.returncode in (0, -signal.SIGTERM), f"prometheus: {tail(prom.log)}"
