"""The deployment files, checked without a Docker engine or a cluster (none runs here).

- docker-compose.yml against the compose specification's JSON schema (check-jsonschema's copy);
- the Dockerfile linted by hadolint, and its RUN steps run into a fresh venv from which every role
  of docker-compose.yml is started, with the file's own commands, and a job runs through them;
- k8s/: the overlay built by kustomize (kubectl's), every object validated against the Kubernetes
  schemas (kubernetes-validate), the KEDA and HPA components checked against the fleet's metrics.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from packaging.requirements import Requirement

from producer import FleetClient
from shared.embedded import server_command
from shared.models import DONE
from shared.ports import free_port, port_open
from shared.settings import Settings
from tests.conftest import stop_process, wait_until
from worker import metrics

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker-compose.yml"
CUSTOM_KINDS = {"ScaledObject", "PodMonitor"}


def run(*args: str | Path, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


# docker-compose.yml


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    check = run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert check.returncode == 0, check.stdout + check.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period: 35s", "stop_grace_period: [35]"))
    assert run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", broken).returncode == 1


def test_compose_runs_a_durable_redis_two_workers_and_health_checks_everywhere() -> None:
    services = compose()["services"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--appendfsync everysec" in redis
    assert "--maxmemory-policy noeviction" in redis and "--maxmemory ${STREAMFLEET_REDIS_MAXMEMORY:-1gb}" in redis
    assert services["worker"]["deploy"]["replicas"] >= 2
    grace = int(services["worker"]["stop_grace_period"].rstrip("s"))
    assert grace >= Settings.model_fields["shutdown_grace_seconds"].default + 5
    assert all("healthcheck" in service for service in services.values() if service.get("restart") != "no")
    assert not any("UPSTREAM_API_KEY" in str(service.get("environment")) for service in services.values())


# Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    lint = run(BIN / "hadolint", ROOT / "Dockerfile")
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_lock_pins_every_runtime_dependency_within_its_range() -> None:
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line and not line.startswith("#")
    )
    pins = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins.items()}
    project = (ROOT / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", project, re.M | re.S)
    assert dependencies is not None
    for line in re.findall(r'"([^"]+)"', dependencies.group(1)):
        requirement = Requirement(line)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{name} is not in requirements.lock: run make lock"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement.specifier}"


def build_stage(root: Path) -> None:
    """Do the Dockerfile's build stage here: its COPY and RUN steps, with the image's absolute paths
    under ``root`` (so a file the image forgets to copy is missing here too)."""

    def here(path: str) -> str:
        return str(root / path.lstrip("/")) if path.startswith("/") else path

    stage = (ROOT / "Dockerfile").read_text().split("\nFROM ")[1]
    for line in stage.splitlines():
        instruction, _, rest = line.partition(" ")
        if instruction == "COPY":
            *sources, target = rest.split()
            for source in sources:
                destination = Path(here(target))
                if target.endswith("/"):
                    destination = destination / Path(source).name
                destination.parent.mkdir(parents=True, exist_ok=True)
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / source, destination)
        elif instruction == "RUN":
            command = " ".join(here(word) for word in rest.split()).replace(
                "python -m venv", f"{sys.executable} -m venv"
            )
            done = subprocess.run(command, shell=True, cwd=root, capture_output=True, text=True, timeout=240)
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_image_steps_install_and_every_compose_role_runs_from_them(
    tmp_path: Path, redis_url: str, state_dir: Path
) -> None:
    (tmp_path / "image").mkdir()
    build_stage(tmp_path / "image")
    venv = tmp_path / "image" / "opt" / "venv"

    services = compose()["services"]
    simulator_port, gateway_port, metrics_port = free_port(), free_port(), free_port()
    ports = {"9000": str(simulator_port), "8000": str(gateway_port), "9100": str(metrics_port)}
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("STREAMFLEET_")},
        "STREAMFLEET_REDIS_URL": redis_url,
        "STREAMFLEET_UPSTREAM_BASE_URL": f"http://127.0.0.1:{simulator_port}/v1",
        "STREAMFLEET_GATEWAY_API_KEYS": "deploy-test-key",
        "STREAMFLEET_STATE_DIR": str(state_dir),
    }
    processes = []
    try:
        for role in ("simulator", "worker", "gateway"):
            command = [ports.get(arg, arg) for arg in services[role]["command"]]
            processes.append(subprocess.Popen([venv / "bin" / "streamfleet", *command], env=env, cwd=tmp_path))
        for port in (simulator_port, gateway_port, metrics_port):
            wait_until(lambda port=port: port_open(port), timeout=30, what=f"port {port}")
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{metrics_port}/readyz").status_code == 200, what="ready")
        assert httpx.get(f"http://127.0.0.1:{gateway_port}/healthz").status_code == 200

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway_port}") as http:
            headers = {"authorization": "Bearer deploy-test-key"}
            body = {"request": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
            created = (await http.post("/v1/jobs", json=body, headers=headers)).json()
        async with FleetClient(Settings(redis_url=redis_url)) as fleet:
            assert (await fleet.wait(created["id"], timeout=30)).type == DONE
    finally:
        for process in processes:
            stop_process(process, signal.SIGTERM, timeout=40)


# k8s/


def kustomize(path: Path) -> list[dict[str, Any]]:
    built = run("kubectl", "kustomize", "--load-restrictor=LoadRestrictionsNone", path)
    assert built.returncode == 0, built.stderr
    return [document for document in yaml.safe_load_all(built.stdout) if document]


def validate(objects: list[dict[str, Any]], tmp_path: Path) -> str:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    checked = run(BIN / "kubernetes-validate", "--strict", manifest)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return checked.stdout + checked.stderr


def by_kind(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(item for item in objects if item["kind"] == kind and item["metadata"]["name"] == name)


def exported(query: str) -> set[str]:
    names = set(re.findall(r"streamfleet_[a-z_]+", query))
    assert names <= {metric._name for metric in vars(metrics).values() if hasattr(metric, "_name")}, names
    return names


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl (its built-in kustomize) is needed to build k8s/: install kubectl")
    return kustomize(ROOT / "k8s" / "overlays" / "production")


def test_production_overlay_is_valid_kubernetes(production: list[dict[str, Any]], tmp_path: Path) -> None:
    kinds = {item["kind"] for item in production}
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap", "ScaledObject"} <= kinds
    core = [item for item in production if item["kind"] not in CUSTOM_KINDS]  # CRDs: checked below
    report = validate(core, tmp_path)
    assert report.count("passed for resource") == len(core)
    assert all(item["metadata"]["namespace"] == "streamfleet" for item in production)
    secret = tmp_path / "secret.yaml"
    secret.write_text((ROOT / "k8s" / "secret.example.yaml").read_text())
    assert run(BIN / "kubernetes-validate", "--strict", secret).returncode == 0


def redis_url_from_secret(container: dict[str, Any]) -> bool:
    """The Redis URL comes from the Secret by name: a Secret without it stops the pod (no fallback)."""
    return {
        "name": "STREAMFLEET_REDIS_URL",
        "valueFrom": {"secretKeyRef": {"name": "streamfleet-secrets", "key": "STREAMFLEET_REDIS_URL"}},
    } in container.get("env", [])


def test_every_pod_meets_the_restricted_pod_security_level(production: list[dict[str, Any]]) -> None:
    for item in production:
        if item["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = item["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_worker_deployment_drains_probes_and_reads_secrets(production: list[dict[str, Any]]) -> None:
    worker = by_kind(production, "Deployment", "streamfleet-worker")
    assert "replicas" not in worker["spec"]  # the autoscaler's: an apply must not reset it
    pod = worker["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert redis_url_from_secret(container)
    assert container["image"].startswith("registry.example.com/streamfleet:")
    assert container["args"][:1] == ["worker"] and "--metrics-port" in container["args"]
    processes = container["args"][container["args"].index("--processes") + 1]  # a pool per pod: one per core
    assert int(processes) == int(container["resources"]["requests"]["cpu"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["terminationGracePeriodSeconds"] >= Settings.model_fields["shutdown_grace_seconds"].default + 5
    assert {"secretRef": {"name": "streamfleet-secrets"}} in container["envFrom"]
    pdb = by_kind(production, "PodDisruptionBudget", "streamfleet-worker")
    assert pdb["spec"]["selector"] == worker["spec"]["selector"]
    redis = by_kind(production, "StatefulSet", "redis")
    args = " ".join(redis["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--appendfsync everysec" in args and "--maxmemory-policy noeviction" in args and "--maxmemory " in args
    assert by_kind(production, "Service", redis["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def test_gateway_liveness_does_not_hang_on_redis(production: list[dict[str, Any]]) -> None:
    container = by_kind(production, "Deployment", "streamfleet-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert "tcpSocket" in container["livenessProbe"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert redis_url_from_secret(container)


def test_prometheus_scrapes_workers_and_gateways_with_a_key(production: list[dict[str, Any]]) -> None:
    for name, port in (("streamfleet-worker", "metrics"), ("streamfleet-gateway", "http")):
        monitor = by_kind(production, "PodMonitor", name)
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        pods = by_kind(production, "Deployment", name)["spec"]["template"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pods["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert (
            endpoint["port"] in {p["name"] for p in pods["spec"]["containers"][0]["ports"]} and endpoint["port"] == port
        )
    gateway = by_kind(production, "PodMonitor", "streamfleet-gateway")["spec"]["podMetricsEndpoints"][0]
    assert gateway["authorization"]["credentials"] == {"name": "streamfleet-secrets", "key": "STREAMFLEET_METRICS_KEY"}


def test_keda_scales_the_worker_on_metrics_the_fleet_exports(production: list[dict[str, Any]]) -> None:
    scaled = by_kind(production, "ScaledObject", "streamfleet-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "streamfleet-worker"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
    assert trigger["metadata"]["ignoreNullValues"] == "false"
    assert trigger["metadata"]["query"].count('{namespace="streamfleet"}') == 2
    assert exported(trigger["metadata"]["query"]) == {"streamfleet_queue_depth", "streamfleet_fleet_running_jobs"}


def with_component(component: str, tmp_path: Path) -> list[dict[str, Any]]:
    """k8s/base with one of k8s/components, built."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base, added = (os.path.relpath(ROOT / "k8s" / part, overlay) for part in ("base", f"components/{component}"))
    (overlay / "kustomization.yaml").write_text(f"resources: [{base}]\ncomponents: [{added}]\n")
    return kustomize(overlay)


def test_hpa_component_is_the_valid_alternative(tmp_path: Path) -> None:
    objects = with_component("hpa", tmp_path)
    validate(objects, tmp_path)
    hpa = by_kind(objects, "HorizontalPodAutoscaler", "streamfleet-worker")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "streamfleet-worker"
    rules = (ROOT / "k8s" / "components" / "hpa" / "kustomization.yaml").read_text()
    query = next(line for line in rules.splitlines() if "metricsQuery" in line)
    assert exported(query) == {"streamfleet_queue_depth", "streamfleet_fleet_running_jobs"}


def test_external_redis_component_runs_the_fleet_on_an_operators_sentinel(tmp_path: Path) -> None:
    """The bundled Valkey goes; the pods still take their Redis URL (a Sentinel URL here) from the Secret."""
    objects = with_component("external-redis", tmp_path)
    assert not [item for item in objects if item["metadata"]["name"].startswith("redis")]
    validate(objects, tmp_path)
    for name in ("streamfleet-worker", "streamfleet-gateway"):
        container = by_kind(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert redis_url_from_secret(container), name
    documented = (ROOT / "k8s" / "components" / "external-redis" / "kustomization.yaml").read_text()
    for url in re.findall(r"(?<!STREAM)_REDIS_URL=(\S+)", documented):
        Settings(redis_url=url.replace("$PW", "secret"))  # the documented URLs are ones the fleet takes
    streams = re.findall(r"STREAMFLEET_STREAM_REDIS_URL=(\S+)", documented)
    assert len(streams) == 2
    for url in streams:
        assert Settings(stream_redis_url=url.replace("$PW", "secret")).stream_redis_url


def test_compose_sentinel_profile_configures_sentinels_the_binary_accepts(tmp_path: Path, redis_url: str) -> None:
    """The profile's replica follows `redis`, and the Sentinels' config, as the compose file writes it, is
    run here by the embedded binary against a real primary: it names that primary."""
    services = compose()["services"]
    assert services["redis-replica"]["profiles"] == services["sentinel"]["profiles"] == ["sentinel"]
    assert "--replicaof redis 6379" in " ".join(services["redis-replica"]["command"])
    assert services["sentinel"]["deploy"]["replicas"] == 3
    script = services["sentinel"]["command"][2]
    config = re.search(r"printf '(.*?)'", script)
    assert config is not None and "sentinel monitor streamfleet redis 6379 2" in config.group(1)
    primary_port = redis_url.rsplit(":", 1)[1].split("/")[0]
    sentinel_port = free_port()
    text = config.group(1).replace("\\n", "\n").replace("26379", str(sentinel_port))
    (tmp_path / "sentinel.conf").write_text(text.replace("redis 6379", f"127.0.0.1 {primary_port}"))
    binary = server_command(0, tmp_path)[0]
    sentinel = subprocess.Popen([binary, str(tmp_path / "sentinel.conf"), "--sentinel"], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(sentinel_port), what="the Sentinel")
        client = redis.Redis(port=sentinel_port, decode_responses=True)
        assert client.sentinel_get_master_addr_by_name("streamfleet") == ("127.0.0.1", int(primary_port))
        client.close()
    finally:
        stop_process(sentinel)
    Settings(redis_url="redis+sentinel://sentinel:26379/streamfleet")  # the URL the file tells you to set


def test_compose_cluster_profile_runs_cluster_nodes_the_binary_accepts(tmp_path: Path) -> None:
    """The profile's three nodes, with their command as the compose file writes it, are run here by the
    embedded binary: each is a cluster node; the init joins all three; the documented URL is one the
    fleet takes for its job streams."""
    services = compose()["services"]
    nodes = ["redis-cluster-1", "redis-cluster-2", "redis-cluster-3"]
    assert all(services[node]["profiles"] == ["cluster"] for node in [*nodes, "redis-cluster-init"])
    script = services["redis-cluster-init"]["command"][2]
    assert "--cluster create" in script and "--cluster-replicas 0" in script
    assert all(node in script for node in nodes)
    processes = []
    try:
        ports = []
        for node in nodes:
            args = [arg.replace("${STREAMFLEET_REDIS_MAXMEMORY:-1gb}", "64mb") for arg in services[node]["command"][1:]]
            args = [arg.replace("/data/nodes.conf", str(tmp_path / f"{node}.conf")) for arg in args]
            port = free_port()
            ports.append(port)
            (tmp_path / node).mkdir()
            bus = ["--cluster-port", str(free_port())]  # not port + 10000, which may pass 65535
            command = [*server_command(port, tmp_path / node), *args, *bus]
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until(lambda: all(port_open(port) for port in ports), what="the cluster nodes")
        for port in ports:
            client = redis.Redis(port=port, decode_responses=True)
            assert client.info("cluster")["cluster_enabled"] == 1
            assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
            client.close()
    finally:
        for process in processes:
            stop_process(process)
    header = (ROOT / "docker-compose.yml").read_text()
    url = re.search(r"STREAMFLEET_STREAM_REDIS_URL=(\S+)", header)
    assert url is not None and Settings(stream_redis_url=url.group(1)).stream_redis_url == url.group(1)
