"""Shared fixtures: a real Kafka broker, embedded and served MLflow, seeded data.

Broker selection, in order: `KAFKA_BOOTSTRAP_SERVERS` if set; a testcontainers Kafka (KRaft) when
a Docker engine answers a ping; otherwise the local broker from the Maven jars in `deploy/kafka/`.
When `CI` is set, a broker or MLflow server that cannot be had fails the test instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

IN_CI = bool(os.environ.get("CI"))
NEEDS_SERVICE = ("kafka", "mlflow_server", "prometheus")
# Where `make prometheus` builds Prometheus and promtool (AEWATCH_PROMETHEUS_DIR overrides).
PROMETHEUS_VERSION = "v0.316.0"


def _unavailable(what: str, why: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required in CI but could not be had: {why}", pytrace=False)
    pytest.skip(f"{what} unavailable: {why}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Record which service a test needs in the JUnit report, so .ci/run can refuse skips of them.
    for item in items:
        for name in NEEDS_SERVICE:
            if item.get_closest_marker(name):
                item.user_properties.append(("needs", name))


# -- what an in-process `aewatch` command leaves behind ----------------------------------------
_CLI_VARIABLES = (
    "MLFLOW_REGISTRY_URI",  # mlflow.set_registry_uri exports it
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
)


@pytest.fixture(autouse=True)
def _command_line_state() -> Iterator[None]:
    """A command run in process sets MLflow's retry variables and the registry retry budget for
    its process (the worker's is no retry at all), and `mlflow.set_registry_uri` exports the
    registry; every test starts from the session's, so a later test's MLflow calls and the
    servers it starts are not left without retries or sent to another test's store."""
    from pipeline.cli import process_state

    with process_state(_CLI_VARIABLES), _root_logging(), _registry_uri():
        yield


@contextlib.contextmanager
def _registry_uri() -> Iterator[None]:
    """A training run in process leaves MLflow's registry URI set to its store (in the module,
    beside the environment variable put back above): a later test's `MlflowClient(server)`
    would be sent to that store's registry ("Registered Model ... not found"). Put back."""
    from mlflow.tracking._model_registry import utils as registry

    saved = registry._registry_uri
    try:
        yield
    finally:
        registry._registry_uri = saved


@contextlib.contextmanager
def _root_logging() -> Iterator[None]:
    """`configure_logging` gives the root logger a handler on the sys.stderr of its moment, which
    under capture is the test's own stream, closed when the test ends: the root's handlers and
    the levels it sets are put back, so a later test's log lines are not written to a closed
    stream ("--- Logging error ---")."""
    import logging

    from pipeline.cli import NOISY_LOGGERS

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)


# -- Kafka ---------------------------------------------------------------------------------------
def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a real Kafka broker for the whole test session."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    from pipeline.errors import BrokerError
    from pipeline.tools.local_broker import LocalKafkaBroker

    broker = LocalKafkaBroker()
    try:
        broker.start()
    except BrokerError as exc:
        _unavailable("Kafka broker", str(exc))
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture
def unique_topic() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def create_topic(kafka_bootstrap: str) -> Iterator:
    """`create_topic(name, partitions)` creates a topic and waits until it has leaders."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=10000)

    def _create(name: str, partitions: int = 1, config: dict | None = None) -> str:
        spec = {"num_partitions": partitions, "replication_factor": 1}
        if config:
            spec["topic_configs"] = config
        admin.create_topics({name: spec})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            described = admin.describe_topics([name])
            parts = described[0].get("partitions", []) if described else []
            if len(parts) == partitions and all(p.get("leader_id", -1) >= 0 for p in parts):
                return name
            time.sleep(0.1)
        raise TimeoutError(f"topic {name} has no leaders after 15s")

    yield _create
    admin.close()


# -- Prometheus ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    """The folder holding the `prometheus` and `promtool` binaries `make prometheus` builds."""
    default = Path.home() / ".cache" / "aewatch" / f"prometheus-{PROMETHEUS_VERSION}"
    folder = Path(os.environ.get("AEWATCH_PROMETHEUS_DIR") or default)
    missing = [n for n in ("prometheus", "promtool") if not os.access(folder / n, os.X_OK)]
    if missing:
        _unavailable("prometheus", f"no {', '.join(missing)} in {folder} (run `make prometheus`)")
    return folder


# -- MLflow --------------------------------------------------------------------------------------
@pytest.fixture
def mlflow_embedded(tmp_path: Path) -> Iterator[str]:
    """An embedded sqlite tracking and registry store with local artifacts, for one test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)  # set_registry_uri exports it


def _start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    from pipeline.tools.local_broker import free_port

    port = free_port()
    env = dict(
        os.environ,
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
        MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
        MLFLOW_WEBHOOK_CACHE_TTL="1",
    )
    log = open(root / "mlflow-server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` process (sqlite backend, local artifacts); yields its URL."""
    import requests

    root = tmp_path_factory.mktemp("mlflow-server")
    proc, url = _start_mlflow_server(root)
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                tail = (root / "mlflow-server.log").read_text(errors="replace")[-3000:]
                _unavailable("mlflow server", f"exited with {proc.returncode}:\n{tail}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                _unavailable("mlflow server", "no /health answer within 120s")
            time.sleep(0.3)
        yield url
    finally:
        _stop_process_group(proc)


def _stop_process_group(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: restarts services mid-test (make test-faults, not make test)"
    )
