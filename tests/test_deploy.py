"""Deployment files agree with the code: docker-compose.yml, deploy/Dockerfile*, deploy/k8s/.

Every AEWATCH_* variable they set is a real worker setting, every `aewatch` command line they run
parses with the real CLI parser, ports, probe paths and scrape annotations match the worker's HTTP
server, and no secret is baked into an image or committed as a manifest.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.settings import declared
from pipeline.worker.settings import WorkerSettings, settings_from_args

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
DOCKERFILES = [ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "Dockerfile.cuda"]
DOCKERIGNORE = ROOT / ".dockerignore"

SETTINGS = [s for s in declared(WorkerSettings) if s.listed]
SETTING_ENVS = {s.env for s in SETTINGS}
DEFAULTS = {s.name: s.default for s in SETTINGS}
WORKER_ENVS = SETTING_ENVS | {"MLFLOW_TRACKING_URI"}
HTTP_PORT = DEFAULTS["http_port"]
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
K8S_FILES = [
    "worker-configmap.yaml",
    "worker-deployment.yaml",
    "worker-service.yaml",
    "worker-pdb.yaml",
    "worker-gpu-deployment.yaml",
    "worker-scaledobject.yaml",
    "training-cronjob.yaml",
    "servicemonitor.yaml",
]


# -- helpers -----------------------------------------------------------------------------------


def interpolate(text: str) -> str:
    """Compose variable interpolation with an empty environment: defaults or ''."""
    text = re.sub(r"(?<!\$)\$\{(\w+)(?::?[-?]([^}]*))?\}", lambda m: m.group(2) or "", text)
    return text.replace("$$", "$")


def env_map(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(
            item.split("=", 1) if "=" in item else (item, "") for item in environment
        )
    return {str(k): interpolate("" if v is None else str(v)) for k, v in environment.items()}


def as_argv(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script: lines split at ;, &&, ||, | (quotes respected)."""
    commands: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in SHELL_OPERATORS:
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
        if current:
            commands.append(current)
    return commands


def compose_aewatch_argvs(service: dict) -> list[list[str]]:
    """Every `aewatch ...` invocation of a compose service, as argv without `aewatch`."""
    image = str(service.get("image", ""))
    entrypoint = as_argv(service.get("entrypoint"))
    command = as_argv(service.get("command"))
    if not entrypoint:
        return [command] if image.startswith("aewatch:") else []
    if entrypoint[0] == "aewatch":
        return [entrypoint[1:] + command]
    if Path(entrypoint[0]).name in ("sh", "bash") and "-c" in entrypoint:
        script = (entrypoint + command)[entrypoint.index("-c") + 1]
        return [c[1:] for c in shell_commands(interpolate(script)) if c[0] == "aewatch"]
    return []


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parse(argv: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports bad flags this way
        pytest.fail(f"`aewatch {shlex.join(argv)}` does not parse (exit {exc.code})")


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\s*\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict]]:
    return {name: load_all(K8S / name) for name in K8S_FILES}


def k8s_object(k8s, kind: str, name: str | None = None) -> dict:
    found = [
        doc
        for docs in k8s.values()
        for doc in docs
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def configmap(k8s) -> dict[str, str]:
    return {k: str(v) for k, v in k8s_object(k8s, "ConfigMap")["data"].items()}


def deployments(k8s) -> list[dict]:
    return [doc for docs in k8s.values() for doc in docs if doc["kind"] == "Deployment"]


def cpu_deployment(k8s) -> dict:
    return k8s_object(k8s, "Deployment", "aewatch-worker")


def gpu_deployment(k8s) -> dict:
    return k8s_object(k8s, "Deployment", "aewatch-worker-gpu")


def worker_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def effective_env(container: dict, configmaps: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it (env wins over envFrom)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        elif "fieldRef" in entry.get("valueFrom", {}):
            env[entry["name"]] = "aewatch-worker-5d4f8c7b9-x2x7q"
        elif "configMapKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["configMapKeyRef"]
            env[entry["name"]] = configmaps[ref["name"]][ref["key"]]
        # secretKeyRef values are unknown here (and optional)
    return env


# -- docker-compose.yml ------------------------------------------------------------------------


def test_compose_has_every_service(services):
    expected = {"kafka", "postgres", "mlflow", "train", "worker", "worker-gpu", "simulator"}
    assert expected | {"alerts"} <= set(services)


def test_compose_sets_only_real_settings(services):
    for name, service in services.items():
        for key in env_map(service):
            if key.startswith("AEWATCH_"):
                assert key in SETTING_ENVS, f"{name}: {key} is not a worker setting"


def test_compose_bakes_no_secret_values(services):
    for name, service in services.items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        for key, value in environment.items():
            if key.startswith("AEWATCH_") and any(w in key for w in SECRET_WORDS):
                assert value is None or str(value).startswith("${"), (
                    f"{name}: {key} has a literal value; pass it from the environment"
                )


def test_compose_worker_port_and_healthcheck(services):
    for name in ("worker", "worker-gpu"):
        service = services[name]
        port = int(env_map(service).get("AEWATCH_HTTP_PORT", HTTP_PORT))
        assert port == HTTP_PORT == 8080
        targets = []
        for entry in service["ports"]:
            if isinstance(entry, dict):
                targets.append(int(entry["target"]))
            else:
                targets.append(int(str(entry).split(":")[-1].split("/")[0]))
        assert port in targets, f"{name}: port {port} not published ({service['ports']})"
        test = " ".join(as_argv(service["healthcheck"]["test"]))
        url = urlparse(re.search(r"https?://[^'\" ]+", test).group(0))
        assert url.path == "/healthz"
        assert url.port == port


def test_compose_worker_start_order(services):
    expected = {
        "kafka": "service_healthy",
        "mlflow": "service_healthy",
        "train": "service_completed_successfully",
    }
    for name in ("worker", "worker-gpu"):
        depends = services[name]["depends_on"]
        assert isinstance(depends, dict), "depends_on needs conditions"
        for dependency, condition in expected.items():
            assert depends[dependency]["condition"] == condition, (name, dependency)
    assert services["train"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["simulator"]["depends_on"]["worker"]["condition"] == "service_healthy"
    assert services["alerts"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for dependency in ("kafka", "postgres", "mlflow", "worker"):
        assert "healthcheck" in services[dependency], f"{dependency} needs a healthcheck"
    assert services["train"].get("restart") == "no"


def test_compose_worker_settings_are_valid(services):
    # The worker reads everything from the environment: the settings object must build.
    for name in ("worker", "worker-gpu"):
        env = env_map(services[name])
        argv = compose_aewatch_argvs(services[name])
        assert argv == [["worker"]], name
        settings = settings_from_args(parse(argv[0]), env)
        assert settings.registry.model == "models:/fleet@champion"
        assert settings.topics.input_topic == ("readings",)
        assert settings.registry.tracking_uri == "http://mlflow:5000"
    assert env_map(services["worker"])["AEWATCH_DEVICE"] == "cpu"
    assert env_map(services["worker-gpu"])["AEWATCH_DEVICE"] == "cuda"


def test_compose_gpu_worker(services):
    service = services["worker-gpu"]
    assert "gpu" in service["profiles"]
    assert service["image"] == "aewatch:cuda"
    assert service["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and int(d.get("count", 0)) >= 1 and "gpu" in d["capabilities"]
        for d in devices
    ), devices
    assert "profiles" not in services["worker"]


def test_compose_kafka_is_single_node_kraft(services):
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = env_map(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[key] == "1", key
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    test = " ".join(as_argv(kafka["healthcheck"]["test"]))
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in test
    workers = [s for s in services.values() if "AEWATCH_BOOTSTRAP_SERVERS" in env_map(s)]
    for service in workers:
        assert env_map(service)["AEWATCH_BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_compose_commands_parse_with_the_real_cli(services):
    known = subcommands()
    used = set()
    for name, service in services.items():
        for argv in compose_aewatch_argvs(service):
            assert argv and argv[0] in known, f"{name}: unknown command {argv[:1]}"
            parse(argv)
            used.add(argv[0])
    assert {"worker", "simulate", "train", "promote", "alerts"} <= used


def test_compose_train_job_registers_and_promotes(services):
    argvs = {argv[0]: parse(argv) for argv in compose_aewatch_argvs(services["train"])}
    assert list(argvs) == ["simulate", "train", "promote"]
    assert argvs["simulate"].csv == argvs["train"].data
    assert argvs["train"].register == argvs["promote"].name == "fleet"
    worker_model = env_map(services["worker"])["AEWATCH_MODEL"]
    assert worker_model == f"models:/{argvs['promote'].name}@champion"


def test_compose_mlflow_server_accepts_its_clients(services):
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    mlflow = services["mlflow"]
    argv = as_argv(mlflow["entrypoint"]) + [interpolate(a) for a in as_argv(mlflow["command"])]
    assert argv[:2] == ["mlflow", "server"]
    options = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert options["--backend-store-uri"].startswith("postgresql://")
    assert urlparse(options["--backend-store-uri"]).hostname == "postgres"
    allowed = (
        [h.strip() for h in options["--allowed-hosts"].split(",")]
        if "--allowed-hosts" in options
        else get_default_allowed_hosts()
    )
    uris = {
        env_map(s)["MLFLOW_TRACKING_URI"]
        for s in services.values()
        if "MLFLOW_TRACKING_URI" in env_map(s)
    }
    assert uris == {"http://mlflow:5000"}
    for uri in uris:
        netloc = urlparse(uri).netloc
        assert is_allowed_host_header(allowed, netloc), f"mlflow server refuses Host {netloc}"
        assert urlparse(uri).port == int(options["--port"])
    env = env_map(mlflow)
    assert env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"
    assert "http" in env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"].split(",")


def test_compose_images_are_built_from_existing_dockerfiles(services):
    built = {}
    for service in services.values():
        if "build" in service:
            dockerfile = (
                ROOT / service["build"].get("context", ".") / service["build"]["dockerfile"]
            )
            assert dockerfile.is_file(), dockerfile
            built[service["image"]] = dockerfile
    for name, service in services.items():
        if str(service.get("image", "")).startswith("aewatch:"):
            assert service["image"] in built, f"{name}: nothing builds {service['image']}"


def test_compose_uses_named_volumes(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} not declared"
    assert {"kafka", "postgres", "mlflow"} <= {
        name for name, s in services.items() if s.get("volumes")
    }


# -- Dockerfiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_bakes_no_secret(path):
    for keyword, rest in dockerfile_instructions(path):
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*=", rest) or rest.split()[:1]
            for name in names:
                assert not any(w in name.upper() for w in SECRET_WORDS), f"{keyword} {name}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_aewatch_as_non_root(path):
    instructions = dockerfile_instructions(path)
    assert ("EXPOSE", str(HTTP_PORT)) in instructions
    entrypoints = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints and yaml.safe_load(entrypoints[-1]) == ["aewatch"]
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    text = path.read_text()
    assert "3.11" in text
    assert "pip install" in text


def test_cpu_image_installs_cpu_torch_first():
    text = DOCKERFILES[0].read_text()
    assert "download.pytorch.org/whl/cpu" in text
    assert text.index("download.pytorch.org/whl/cpu") < text.index('pip install ".[server]"')


def test_dockerignore_keeps_the_context_small_and_complete():
    patterns = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for required in (".venv", ".git", "results", "deploy/kafka/libs"):
        assert required in patterns, required
    # what the Dockerfiles copy must stay in the context
    for path in DOCKERFILES:
        for keyword, rest in dockerfile_instructions(path):
            if keyword == "COPY" and "--from" not in rest:
                for source in rest.split()[:-1]:
                    assert (ROOT / source).exists(), source
                    ignored = [p for p in patterns if fnmatch.fnmatch(source, p)]
                    assert not ignored, f"{source} is excluded by .dockerignore {ignored}"


# -- Kubernetes ----------------------------------------------------------------------------------


def test_every_manifest_parses_and_is_listed(k8s):
    for name, docs in k8s.items():
        assert docs, name
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), name
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(K8S_FILES)
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(K8S_FILES)


def test_k8s_sets_only_real_settings(k8s):
    for key in configmap(k8s):
        assert key in WORKER_ENVS, f"ConfigMap: {key} is not a worker setting"
    for deployment in deployments(k8s):
        for entry in worker_container(deployment).get("env", []):
            assert entry["name"] in WORKER_ENVS, f"{deployment['metadata']['name']}: {entry}"


def test_k8s_worker_settings_are_valid(k8s):
    configmaps = {k8s_object(k8s, "ConfigMap")["metadata"]["name"]: configmap(k8s)}
    for deployment in deployments(k8s):
        container = worker_container(deployment)
        assert [a for a in container.get("command", ["aewatch"])] == ["aewatch"]
        args = parse(container["args"])
        assert args.command == "worker"
        env = effective_env(container, configmaps)
        settings = settings_from_args(args, env)
        assert settings.kafka.group_instance_id, "static membership from the pod name"
        assert settings.http.http_port == HTTP_PORT
        assert settings.registry.tracking_uri
    assert (
        effective_env(worker_container(cpu_deployment(k8s)), configmaps)["AEWATCH_DEVICE"] == "cpu"
    )
    assert (
        effective_env(worker_container(gpu_deployment(k8s)), configmaps)["AEWATCH_DEVICE"] == "cuda"
    )


def test_k8s_group_instance_id_comes_from_the_pod_name(k8s):
    for deployment in deployments(k8s):
        env = {e["name"]: e for e in worker_container(deployment)["env"]}
        ref = env["AEWATCH_GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]
        assert ref["fieldPath"] == "metadata.name"


def test_k8s_credentials_come_from_a_secret_that_is_not_in_the_repo(k8s):
    for docs in k8s.values():
        for doc in docs:
            assert doc["kind"] != "Secret", "a Secret with data is committed"
    for key in configmap(k8s):
        assert not any(w in key for w in SECRET_WORDS), f"{key} belongs in the Secret"
    for deployment in deployments(k8s):
        env = {e["name"]: e for e in worker_container(deployment)["env"]}
        for name in ("AEWATCH_SASL_USERNAME", "AEWATCH_SASL_PASSWORD", "AEWATCH_WEBHOOK_SECRET"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "aewatch-kafka-credentials"
            assert ref["optional"] is True
        for entry in env.values():
            if any(w in entry["name"] for w in SECRET_WORDS):
                assert "value" not in entry, f"{entry['name']} has a literal value"


def _members(deployment) -> int:
    env = {e["name"]: e.get("value") for e in worker_container(deployment)["env"]}
    return int(env.get("AEWATCH_PROCESSES") or 1)


def test_k8s_ports_and_probes(k8s):
    from pipeline.worker.supervisor import STOP_GRACE_S

    for deployment in deployments(k8s):
        container = worker_container(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        members = _members(deployment)
        # member i serves on HTTP_PORT + i: every one named, so that every one is scraped
        names = ["http"] + [f"http-{i}" for i in range(1, members)]
        assert ports == {name: HTTP_PORT + i for i, name in enumerate(names)}
        assert HTTP_PORT == 8080
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        spec = deployment["spec"]["template"]["spec"]
        grace = spec["terminationGracePeriodSeconds"]
        # a supervisor gives its members STOP_GRACE_S to checkpoint before it stops them
        assert grace > STOP_GRACE_S if members > 1 else grace == 60
        resources = container["resources"]
        assert resources["requests"] and resources["limits"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    assert cpu_deployment(k8s)["spec"]["replicas"] == 2


def test_k8s_prometheus_annotations_match_the_container(k8s):
    for deployment in deployments(k8s):
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        container = worker_container(deployment)
        if _members(deployment) > 1:  # an annotation names one port: the ServiceMonitor's job
            assert "prometheus.io/scrape" not in annotations
            continue
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"])
        assert annotations["prometheus.io/path"] == "/metrics"


def test_k8s_service_and_servicemonitor_reach_the_workers(k8s):
    service = k8s_object(k8s, "Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    served = {p["name"]: p for p in service["spec"]["ports"]}
    port = served["http"]
    assert port["port"] == HTTP_PORT and port["targetPort"] == "http"
    for deployment in deployments(k8s):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        for member in worker_container(deployment)["ports"]:  # every member of every pod
            exposed = served[member["name"]]
            assert exposed["targetPort"] == member["name"]
            assert exposed["port"] == member["containerPort"]
    monitor = k8s_object(k8s, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    endpoints = monitor["spec"]["endpoints"]
    assert sorted(e["port"] for e in endpoints) == sorted(served)
    assert {e["path"] for e in endpoints} == {"/metrics"}


def test_k8s_pdb_covers_the_workers(k8s):
    pdb = k8s_object(k8s, "PodDisruptionBudget")
    # a drain must be able to evict the last worker the ScaledObject keeps (minimum 1)
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    labels = cpu_deployment(k8s)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_gpu_worker(k8s):
    deployment = gpu_deployment(k8s)
    container = worker_container(deployment)
    assert container["image"] == "aewatch:cuda"
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    # several group members per pod feed the one GPU, each with the librdkafka client
    processes = int(env["AEWATCH_PROCESSES"])
    assert processes > 1 and env["AEWATCH_KAFKA_CLIENT"] == "confluent"
    assert int(container["resources"]["requests"]["cpu"]) >= processes
    spec = deployment["spec"]["template"]["spec"]
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    # the CPU and GPU Deployments must not claim each other's pods
    cpu_selector = cpu_deployment(k8s)["spec"]["selector"]["matchLabels"]
    gpu_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert not cpu_selector.items() <= gpu_labels.items()


def test_k8s_scaledobject_matches_the_worker(k8s):
    scaled = k8s_object(k8s, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == cpu_deployment(k8s)["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 1
    text = (K8S / "worker-scaledobject.yaml").read_text()
    partitions = [int(n) for n in re.findall(r"(\d+)\s+partitions", text)]
    assert partitions, "say how many partitions the topic has"
    assert scaled["spec"]["maxReplicaCount"] <= min(partitions)
    assert scaled["spec"]["maxReplicaCount"] == 8
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    settings = configmap(k8s)
    assert meta["bootstrapServers"] == settings["AEWATCH_BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == settings.get("AEWATCH_GROUP_ID", DEFAULTS["group_id"])
    assert meta["topic"] in settings["AEWATCH_INPUT_TOPIC"].split(",")
    assert meta["lagThreshold"] == "1000"
    assert meta["allowIdleConsumers"] == "false"


def test_k8s_training_cronjob(k8s):
    cronjob = k8s_object(k8s, "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    containers = pod.get("initContainers", []) + pod["containers"]
    configmaps = {k8s_object(k8s, "ConfigMap")["metadata"]["name"]: configmap(k8s)}
    known = subcommands()
    commands = {}
    for container in containers:
        assert container.get("command", ["aewatch"]) == ["aewatch"]
        argv = [str(a) for a in container["args"]]
        assert argv[0] in known
        commands[argv[0]] = parse(argv)
        env = effective_env(container, configmaps)
        assert env["MLFLOW_TRACKING_URI"] == configmaps["aewatch-worker"]["MLFLOW_TRACKING_URI"]
        for name in env:
            assert name in WORKER_ENVS, name
    assert list(commands) == ["train", "promote"]
    assert commands["train"].register == commands["promote"].name == "fleet"
    assert configmap(k8s)["AEWATCH_MODEL"] == f"models:/{commands['promote'].name}@champion"
    mounts = {m["mountPath"]: m["name"] for c in containers for m in c.get("volumeMounts", [])}
    assert mounts["/data"] in {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert commands["train"].data.startswith("/data/")
