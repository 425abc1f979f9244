"""The deployment artifacts agree with the settings object and with the local mode.

docker-compose.yml and the Helm chart must carry exactly the LDIT_ variables of
service/settings.py, ask for a GPU for the worker, and start the same commands as the local
mode (`python -m service api|worker`, `python build_engine.py --output-dir DIR --if-stale`).

The chart tests render it with Helm's Go SDK from the deploy tools' virtual environment
(.ci/deploy_checks.sh makes it: <repo>/.venv-deploy, or $LDIT_DEPLOY_VENV). Without that venv
they skip with the reason, except under CI=true, where they fail: CI always makes it first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.settings import Settings, env_var_names

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CHART = ROOT / "helm" / "lightningdit"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY_VENV = Path(os.environ.get("LDIT_DEPLOY_VENV", ROOT / ".venv-deploy"))
DEPLOY_PY = DEPLOY_VENV / "bin" / "python"

SETTINGS_VARS = set(env_var_names())
API_CMD = ["python", "-m", "service", "api"]
WORKER_CMD = ["python", "-m", "service", "worker"]
LOCAL_CMD = ["python", "-m", "service"]
COMPOSE_APP_SERVICES = ["engine-build", "api", "worker", "local"]
VALUE_SETS = ["default"] + sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
INTERPOLATION = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+)(?::-(?P<default>[^}]*))?\}$")


# --- helpers ---------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def resolved_env(environment: dict) -> dict[str, str]:
    """A compose environment block as the container sees it with an empty shell: `${X:-d}`
    gives d, a variable without a value is left out (unset)."""
    out = {}
    for key, value in environment.items():
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        m = INTERPOLATION.match(text)
        if m:
            text = m.group("default") or ""
        assert "${" not in text, f"{key}: unhandled interpolation {value!r}"
        out[key] = text
    return out


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in SETTINGS_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def option(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


# --- docker compose ----------------------------------------------------------------------------
@pytest.mark.parametrize("service", COMPOSE_APP_SERVICES)
def test_compose_environment_is_exactly_the_settings(service: str) -> None:
    env = compose()["services"][service]["environment"]
    assert isinstance(env, dict), "use the mapping form so the shared anchor can be checked"
    names = set(env)
    assert names - SETTINGS_VARS == set(), f"{service}: variables that are no setting"
    assert SETTINGS_VARS - names == set(), f"{service}: settings missing from compose"


@pytest.mark.parametrize("service", COMPOSE_APP_SERVICES)
def test_compose_environment_values_are_valid_settings(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = resolved_env(compose()["services"][service]["environment"])
    s = settings_from_env(env, monkeypatch)
    assert s.host == "0.0.0.0" and s.port == 8000
    assert str(s.engine_dir) == "/engines"
    if service == "local":
        assert s.redis_url is None, "the all-in-one mode uses its embedded Redis"
        assert (s.device, s.backend) == ("cpu", "torch")
    else:
        assert s.redis_url == "redis://redis:6379/0"
        # the GPU path scripts/gpu_check.sh verified (docs/benchmarks.md)
        assert (s.device, s.backend, s.precision, s.cuda_graphs, s.compile) == ("cuda", "torch", "fp16", True, True)


def test_compose_gpu_stack_shares_one_settings_block() -> None:
    services = compose()["services"]
    envs = {name: services[name]["environment"] for name in ("engine-build", "api", "worker")}
    assert envs["api"] == envs["worker"] == envs["engine-build"]


@pytest.mark.parametrize("service", ["worker", "engine-build"])
def test_compose_gpu_services_reserve_an_nvidia_gpu(service: str) -> None:
    devices = compose()["services"][service]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and int(d.get("count", 0)) >= 1
        for d in devices
    ), devices


def test_compose_api_and_local_reserve_no_gpu() -> None:
    services = compose()["services"]
    for name in ("api", "local", "redis"):
        assert "deploy" not in services[name], f"{name} must run without a GPU"


def test_compose_commands_match_the_local_mode() -> None:
    services = compose()["services"]
    assert services["api"]["command"] == API_CMD
    assert services["worker"]["command"] == WORKER_CMD
    assert services["local"]["command"] == LOCAL_CMD
    build = services["engine-build"]["command"]
    # a shell gate: artifacts only for the backends that read them
    assert build[:2] == ["sh", "-c"] and "onnxruntime|tensorrt)" in build[2]
    argv = build[2][build[2].index("python build_engine.py"):].split(";")[0].split()
    assert "--if-stale" in argv
    assert option(argv, "--output-dir") == services["engine-build"]["environment"]["LDIT_ENGINE_DIR"]
    # the worker reads the engines the build wrote: same volume at the same path
    assert "engines:/engines" in services["engine-build"]["volumes"]
    assert "engines:/engines" in services["worker"]["volumes"]


def test_compose_startup_order_and_shutdown() -> None:
    services = compose()["services"]
    worker = services["worker"]
    assert worker["depends_on"]["engine-build"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert re.fullmatch(r"(\d+)s", worker["stop_grace_period"]) and int(worker["stop_grace_period"][:-1]) >= 60
    redis = services["redis"]
    assert redis["image"].startswith("redis:7") and "--appendonly" in redis["command"]
    assert "healthcheck" in redis and any(v.endswith(":/data") for v in redis["volumes"])
    assert services["local"]["profiles"] == ["cpu"]
    for name in ("api", "worker", "local"):
        assert "test" in services[name]["healthcheck"], name


def test_compose_monitoring_profile_uses_the_charts_rules_and_dashboard() -> None:
    """Profile `monitoring`: Prometheus with the chart's rules directory, Grafana provisioned with its dashboard
    directory; both pinned, neither started without the profile."""
    services = compose()["services"]
    prom, grafana = services["prometheus"], services["grafana"]
    assert prom["profiles"] == grafana["profiles"] == ["monitoring"]
    assert re.fullmatch(r"prom/prometheus:v3\.\d+\.\d+", prom["image"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    assert "./helm/lightningdit/rules:/etc/prometheus/rules:ro" in prom["volumes"]
    assert "./monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules/*.yaml"]
    targets = {(d["names"][0], d["port"]) for job in config["scrape_configs"] for d in job.get("dns_sd_configs", [])}
    assert targets == {("api", 8000), ("worker", int(services["worker"]["expose"][0])), ("local", 8000)}
    provider = yaml.safe_load((ROOT / "monitoring" / "grafana" / "provisioning" / "dashboards" / "lightningdit.yaml")
                              .read_text())["providers"][0]
    mount = f"./helm/lightningdit/dashboards:{provider['options']['path']}:ro"
    assert mount in grafana["volumes"]
    assert "./monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    source = yaml.safe_load((ROOT / "monitoring" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
                            .read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]


# --- Dockerfile ------------------------------------------------------------------------------
def test_dockerfile_targets_user_healthcheck_volumes() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M)
    stages = {stage: image for image, stage in froms}
    assert re.fullmatch(r"nvcr\.io/nvidia/(pytorch|tensorrt):\d\d\.\d\d-py3", stages["gpu"]), stages
    assert stages["cpu"] == "python:3.11-slim"
    assert froms[-1][1] == "gpu", "the default target is the GPU runtime"
    assert not re.search(r":latest\b", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and all(u.split(":")[0] not in ("0", "root") for u in users)
    assert text.count("HEALTHCHECK") >= 2 and "/healthz" in text
    assert re.search(r'^VOLUME \[.*"/engines".*"/models".*\]', text, re.M)
    # torch: the pinned CPU build in the cpu target, never reinstalled over the NGC one
    assert "TORCH_VERSION=2.13.0" in text
    gpu_part = text[text.index("AS gpu") :]
    assert "torch==" not in gpu_part.replace("'torch', 'tensorrt'", "")


def test_dockerignore_keeps_what_the_image_copies() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    assert lines[lines.index("*")] == "*"
    copied = set(re.findall(r"^COPY (?:--chown=\S+ )?(?!--from)(.+?) \S+$", DOCKERFILE.read_text(), re.M))
    sources = {src for group in copied for src in group.split()}
    for src in sources:
        assert f"!{src}" in lines, f"{src} is COPYed but excluded from the build context"


# --- docs ------------------------------------------------------------------------------------
def test_docs_settings_table_is_generated_from_settings() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "deploy_settings_table.py")], capture_output=True, text=True, check=True
    ).stdout.strip()
    doc = (ROOT / "docs" / "deploy.md").read_text()
    m = re.search(r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", doc, re.S)
    assert m, "docs/deploy.md lacks the settings-table markers"
    assert m.group(1).strip() == out, "regenerate: .venv/bin/python .ci/deploy_settings_table.py"
    for name in SETTINGS_VARS:
        assert f"`{name}`" in out


# --- Helm chart (rendered with Helm's Go SDK) ---------------------------------------------------
@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    if not DEPLOY_PY.exists():
        reason = f"deploy tools venv {DEPLOY_VENV} is missing: run .ci/deploy_checks.sh first"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("rendered")
    proc = subprocess.run(
        [
            str(DEPLOY_PY),
            str(ROOT / ".ci" / "deploy_render.py"),
            "--chart",
            str(CHART),
            "--out",
            str(out),
            "--step",
            "template",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {name: list(yaml.safe_load_all((out / name / "manifests.yaml").read_text())) for name in VALUE_SETS}


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def one(docs: list[dict], kind: str, suffix: str) -> dict:
    found = [d for name, d in objects(docs, kind).items() if name.endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} *{suffix}, got {len(found)}"
    return found[0]


def settings_configmap(docs: list[dict]) -> dict:
    """The ConfigMap of LDIT_ settings (the other one, with dashboards.enabled, holds the dashboard)."""
    cms = [cm for cm in objects(docs, "ConfigMap").values()
           if cm["metadata"]["labels"].get("app.kubernetes.io/component") != "dashboards"]
    assert len(cms) == 1, [cm["metadata"]["name"] for cm in cms]
    return cms[0]


def configmap_env(docs: list[dict]) -> dict[str, str]:
    return settings_configmap(docs)["data"]


def pod_spec(docs: list[dict], component: str) -> dict:
    return one(docs, "Deployment", f"-{component}")["spec"]["template"]["spec"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_chart_configmap_is_exactly_the_settings(rendered: dict, value_set: str) -> None:
    names = set(configmap_env(rendered[value_set]))
    assert names - SETTINGS_VARS == set(), "ConfigMap variables that are no setting"
    assert SETTINGS_VARS - names == set(), "settings missing from the ConfigMap"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_chart_configmap_values_are_valid_settings(
    rendered: dict, value_set: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {k: v for k, v in configmap_env(rendered[value_set]).items() if v != ""}
    s = settings_from_env(env, monkeypatch)
    assert s.host == "0.0.0.0" and s.port == 8000 and str(s.engine_dir) == "/engines"
    assert s.redis_url and s.redis_url.startswith(("redis://", "rediss://"))
    assert str(s.redis_password_file).startswith("/var/run/secrets/")
    assert s.profile_opt_rows <= s.max_batch_size


def test_chart_empty_configmap_values_mean_the_default(rendered: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ConfigMap key is present, so an optional setting the chart leaves off is "".
    pydantic-settings reads "" as a value (Path("") == ".") unless env_ignore_empty is on."""
    env = configmap_env(rendered["default"])
    empty = sorted(k for k, v in env.items() if v == "")
    assert "LDIT_API_KEYS_FILE" in empty  # no API keys Secret in the default values
    if not Settings.model_config.get("env_ignore_empty"):
        pytest.xfail(f"service/settings.py lacks env_ignore_empty=True: {empty} would not read as unset")
    s = settings_from_env(env, monkeypatch)
    for name in empty:
        field = name.removeprefix("LDIT_").lower()
        assert getattr(s, field) == Settings.model_fields[field].default, name


def test_chart_worker_requests_a_gpu(rendered: dict) -> None:
    spec = pod_spec(rendered["gpu-keda-redis"], "worker")
    worker = next(c for c in spec["containers"] if c["name"] == "worker")
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert not spec.get("initContainers"), "the torch backend needs no engine build"
    trt = pod_spec(rendered["external-redis"], "worker")  # backend tensorrt: plans built on the GPU
    build = next(c for c in trt["initContainers"] if c["name"] == "engine-build")
    assert int(build["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    # the API never takes a GPU
    api = pod_spec(rendered["gpu-keda-redis"], "api")["containers"][0]
    assert "nvidia.com/gpu" not in api["resources"].get("limits", {})
    # CPU defaults: no GPU request anywhere
    default_worker = pod_spec(rendered["default"], "worker")["containers"][0]
    assert "nvidia.com/gpu" not in default_worker["resources"].get("limits", {})


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_chart_commands_match_the_local_mode(rendered: dict, value_set: str) -> None:
    docs = rendered[value_set]
    env = configmap_env(docs)
    cm_name = settings_configmap(docs)["metadata"]["name"]
    api = pod_spec(docs, "api")
    worker = pod_spec(docs, "worker")
    assert api["containers"][0]["command"] == API_CMD
    assert worker["containers"][0]["command"] == WORKER_CMD
    if env["LDIT_BACKEND"] == "torch":
        assert not worker.get("initContainers"), "engine artifacts are built only for onnxruntime/tensorrt"
        return
    build = worker["initContainers"][0]
    argv = build["command"] if build["command"][0] == "python" else build["command"][-1].split(";")[0].split()
    assert argv[:2] == ["python", "build_engine.py"] and "--if-stale" in argv
    assert option(argv, "--output-dir") == env["LDIT_ENGINE_DIR"]
    # the same settings for every process
    for container in [api["containers"][0], worker["containers"][0], build]:
        assert {"configMapRef": {"name": cm_name}} in container["envFrom"]
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/var/run/secrets/lightningdit/redis"}
    for container in [worker["containers"][0], build]:
        assert any(m["mountPath"] == env["LDIT_ENGINE_DIR"] for m in container["volumeMounts"])
    gpu = any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in worker["containers"])
    # a GPU worker needs TensorRT: only exit 0 passes; on CPU exit 3 (ONNX only) passes too
    assert (build["command"][0] == "python") == gpu
    if not gpu:
        assert '"$rc" -eq 3' in build["command"][-1]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_chart_pods_are_hardened_and_probed(rendered: dict, value_set: str) -> None:
    docs = rendered[value_set]
    for component in ("api", "worker"):
        spec = pod_spec(docs, component)
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
        main = spec["containers"][0]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in main, f"{component}: {probe}"
    assert pod_spec(docs, "worker")["terminationGracePeriodSeconds"] >= 60
    worker = pod_spec(docs, "worker")["containers"][0]
    assert worker["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert {"containerPort": int(configmap_env(docs)["LDIT_METRICS_PORT"])}.items() <= worker["ports"][0].items()
    assert pod_spec(docs, "api")["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert objects(docs, "PodDisruptionBudget"), "PDBs"


def test_chart_keda_scales_workers_on_the_job_stream(rendered: dict) -> None:
    for value_set in ("gpu-keda-redis", "external-redis"):
        docs = rendered[value_set]
        env = configmap_env(docs)
        so = one(docs, "ScaledObject", "-worker")
        worker = one(docs, "Deployment", "-worker")
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert so["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
        assert "replicas" not in worker["spec"], "KEDA owns the worker replica count"
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["stream"] == f"{env['LDIT_KEY_PREFIX']}:jobs"
        assert meta["consumerGroup"] == "workers"
        assert {"lagCount", "pendingEntriesCount"} & set(meta)
        assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
        auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        secret_names = {v["secret"]["secretName"] for v in pod_spec(docs, "worker")["volumes"] if "secret" in v}
        assert auth["spec"]["secretTargetRef"][0]["name"] in secret_names
    assert not objects(rendered["default"], "ScaledObject")


def test_chart_redis_bundled_and_external(rendered: dict) -> None:
    bundled = rendered["gpu-keda-redis"]
    sts = one(bundled, "StatefulSet", "-redis")
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    host = configmap_env(bundled)["LDIT_REDIS_URL"].split("//")[1].split(":")[0]
    assert host in objects(bundled, "Service")
    external = rendered["external-redis"]
    assert not objects(external, "StatefulSet")
    assert configmap_env(external)["LDIT_REDIS_URL"].startswith("rediss://")
    volumes = {v["name"]: v for v in pod_spec(external, "api")["volumes"]}
    assert volumes["redis-password"]["secret"]["secretName"] == "redis-credentials"
    assert configmap_env(external)["LDIT_API_KEYS_FILE"] != ""


def test_chart_dashboard_configmap_and_prometheus_rule(rendered: dict) -> None:
    """dashboards.enabled and prometheusRule.enabled (the gpu-keda-redis example): the dashboard JSON and the
    rules file of the chart, unchanged, in a ConfigMap labelled for the Grafana sidecar and a PrometheusRule."""
    docs = rendered["gpu-keda-redis"]
    (cm,) = [d for d in objects(docs, "ConfigMap").values()
             if d["metadata"]["labels"].get("app.kubernetes.io/component") == "dashboards"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LightningDiT"}
    assert json.loads(cm["data"]["lightningdit.json"]) == json.loads((CHART / "dashboards" / "lightningdit.json").read_text())
    rule = one(docs, "PrometheusRule", "-lightningdit")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == yaml.safe_load((CHART / "rules" / "lightningdit.rules.yaml").read_text())
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(alerts) >= 7 and all(isinstance(r["expr"], str) for g in rule["spec"]["groups"] for r in g["rules"])
    for value_set in VALUE_SETS:
        if value_set != "gpu-keda-redis":
            assert not objects(rendered[value_set], "PrometheusRule"), value_set
            assert len(objects(rendered[value_set], "ConfigMap")) == 1, value_set
