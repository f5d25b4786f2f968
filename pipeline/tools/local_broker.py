"""A real single-node Apache Kafka broker (KRaft) run from the jars in `deploy/kafka/`.

Used by the tests and by `aewatch demo` on machines without Docker. Each start formats storage in
a fresh directory, takes free loopback ports, and returns only once an admin request succeeds.
`stop()` sends SIGTERM (a controlled shutdown) and SIGKILL after a timeout; a stopped broker can be
started again on the same ports and data (`stop(remove_data=False)` then `start()`), which is how
fault tests restart it.

    with LocalKafkaBroker() as broker:
        print(broker.bootstrap_servers)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from string import Template

from pipeline.errors import BrokerError

__all__ = ["DEFAULT_KAFKA_HOME", "LocalKafkaBroker", "free_port", "free_ports", "resolve_jars"]

log = logging.getLogger(__name__)

DEFAULT_KAFKA_HOME = Path(__file__).resolve().parents[2] / "deploy" / "kafka"
_STAMP = ".resolved"


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports on 127.0.0.1 that nothing listens on right now: all are held
    until the last is found, since the kernel may hand a just-released port out again."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def _pom_digest(kafka_home: Path) -> str:
    return hashlib.sha256((kafka_home / "pom.xml").read_bytes()).hexdigest()


def resolve_jars(kafka_home: Path = DEFAULT_KAFKA_HOME, mvn: str = "mvn") -> Path:
    """Resolve the broker jars with Maven into `kafka_home/libs` unless the pom is unchanged."""
    libs = kafka_home / "libs"
    stamp = kafka_home / _STAMP
    digest = _pom_digest(kafka_home)
    if libs.is_dir() and stamp.is_file() and stamp.read_text().strip() == digest:
        return libs
    if shutil.which(mvn) is None:
        raise BrokerError(f"Maven ('{mvn}') is not on PATH; it is needed to resolve the Kafka jars")
    shutil.rmtree(libs, ignore_errors=True)
    cmd = [
        mvn,
        "-B",
        "-q",
        "-f",
        str(kafka_home / "pom.xml"),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={libs}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BrokerError(
            f"resolving Kafka jars failed: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    stamp.write_text(digest + "\n")
    return libs


def _cluster_id() -> str:
    """A random KRaft cluster id; like Kafka's own, never starting with '-' (read as a flag)."""
    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not candidate.startswith("-"):
            return candidate


class LocalKafkaBroker:
    """One Kafka broker process on loopback; a context manager that always cleans up."""

    def __init__(
        self,
        kafka_home: Path | str = DEFAULT_KAFKA_HOME,
        *,
        work_dir: Path | str | None = None,
        java: str = "java",
        heap: str = "768m",
        listeners: Mapping[str, str] | None = None,
        extra_properties: Mapping[str, str] | None = None,
        jvm_options: tuple[str, ...] = (),
        startup_timeout_s: float = 90.0,
        scram_users: Mapping[str, str] | None = None,
    ) -> None:
        """`listeners` maps listener names to security protocols for extra listeners, e.g.
        `{"SASL_SSL": "SASL_SSL"}`; each gets its own free port. PLAINTEXT is always present and
        is the one `bootstrap_servers` names. `scram_users` ({name: password}) are written into
        the storage as SCRAM-SHA-512 credentials when it is formatted."""
        self.kafka_home = Path(kafka_home)
        self.java = java
        self.heap = heap
        self.extra_properties = dict(extra_properties or {})
        self.jvm_options = tuple(jvm_options)
        self.startup_timeout_s = startup_timeout_s
        self.scram_users = dict(scram_users or {})
        self._own_dir = work_dir is None
        self.work_dir = (
            Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="aewatch-kafka-"))
        )
        self.protocols: dict[str, str] = {
            "PLAINTEXT": "PLAINTEXT",
            "CONTROLLER": "PLAINTEXT",
            **(listeners or {}),
        }
        self.ports: dict[str, int] = dict(
            zip(self.protocols, free_ports(len(self.protocols)), strict=True)
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.ports['PLAINTEXT']}"

    def address(self, listener: str) -> str:
        return f"127.0.0.1:{self.ports[listener]}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "broker.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> LocalKafkaBroker:
        if self.running:
            return self
        libs = resolve_jars(self.kafka_home)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "server.properties"
        config.write_text(self._render())
        classpath = f"{libs}{os.sep}*"
        if not (self.work_dir / "data" / "meta.properties").exists():
            cluster_id = _cluster_id()
            fmt = subprocess.run(
                [
                    self.java,
                    "-cp",
                    classpath,
                    *self._jvm_flags(),
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(config),
                    *(
                        arg
                        for name, password in self.scram_users.items()
                        for arg in (
                            "--add-scram",
                            f"SCRAM-SHA-512=[name={name},password={password}]",
                        )
                    ),
                ],
                capture_output=True,
                text=True,
            )
            if fmt.returncode != 0:
                raise BrokerError(f"formatting Kafka storage failed: {fmt.stdout}{fmt.stderr}")
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self._proc = subprocess.Popen(
            [
                self.java,
                f"-Xmx{self.heap}",
                "-Xms256m",
                *self._jvm_flags(),
                "-cp",
                classpath,
                "kafka.Kafka",
                str(config),
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(remove_data=False)
            raise
        self.startup_seconds = time.monotonic() - started
        log.info(
            "kafka broker ready at %s in %.1fs (pid %d)",
            self.bootstrap_servers,
            self.startup_seconds,
            self._proc.pid,
        )
        return self

    def stop(self, timeout_s: float = 30.0, *, remove_data: bool = True) -> None:
        """SIGTERM for a controlled shutdown; SIGKILL if it has not exited after `timeout_s`."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("kafka broker did not stop in %.0fs; killing it", timeout_s)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if remove_data and self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL without a controlled shutdown (for fault tests); data is kept."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> LocalKafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------
    def _jvm_flags(self) -> list[str]:
        return [
            f"-Dlog4j2.configurationFile={self.kafka_home / 'log4j2.yaml'}",
            f"-Dkafka.logs.dir={self.work_dir}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            *self.jvm_options,
        ]

    def _render(self) -> str:
        names = list(self.ports)
        listeners = ",".join(f"{n}://127.0.0.1:{self.ports[n]}" for n in names)
        advertised = ",".join(
            f"{n}://127.0.0.1:{self.ports[n]}" for n in names if n != "CONTROLLER"
        )
        protocol_map = ",".join(f"{n}:{self.protocols[n]}" for n in names)
        template = Template((self.kafka_home / "server.properties.template").read_text())
        return template.substitute(
            controller_port=self.ports["CONTROLLER"],
            listeners=listeners,
            advertised_listeners=advertised,
            protocol_map=protocol_map,
            inter_broker_listener="PLAINTEXT",
            log_dir=self.work_dir / "data",
            extra="\n".join(f"{k}={v}" for k, v in self.extra_properties.items()),
        )

    def _log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no broker log)"

    def _wait_ready(self) -> None:
        from pipeline.kafka_io import open_client
        from pipeline.kafka_io.settings import KafkaConnection

        kafka = open_client(KafkaConnection(self.bootstrap_servers))
        deadline = time.monotonic() + self.startup_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise BrokerError(f"kafka broker exited during start-up:\n{self._log_tail()}")
            try:
                # A plain TCP connect first: the admin client backs off for seconds on refusal.
                with socket.create_connection(("127.0.0.1", self.ports["PLAINTEXT"]), timeout=1):
                    pass
            except OSError as exc:
                last_error = exc
                time.sleep(0.1)
                continue
            try:
                kafka.ping()  # cluster and topics described
                return
            except Exception as exc:  # noqa: BLE001 - any failure here means "not ready yet"
                last_error = exc
                time.sleep(0.25)
        raise BrokerError(
            f"kafka broker not ready after {self.startup_timeout_s:.0f}s "
            f"({last_error!r}):\n{self._log_tail()}"
        )


# -- `aewatch broker` -------------------------------------------------------------------------
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "broker",
        help="run a local single-node Kafka broker (KRaft, from deploy/kafka) until interrupted",
        description="Start a real Kafka broker on a free loopback port, print its address, and "
        "stop it cleanly on Ctrl-C or SIGTERM.",
    )
    parser.add_argument(
        "--kafka-home",
        default=str(DEFAULT_KAFKA_HOME),
        help="folder with pom.xml, the config template and libs/ (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="keep broker data here (default: a fresh temporary folder, removed on exit)",
    )
    parser.set_defaults(handler=_run_broker)


def _run_broker(args: argparse.Namespace) -> int:
    broker = LocalKafkaBroker(args.kafka_home, work_dir=args.data_dir)
    stop = {"now": False}

    def _on_signal(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with broker:
        print(f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
        while not stop["now"] and broker.running:
            time.sleep(0.5)
        if not stop["now"]:  # (its log goes with a temporary data folder: its last line here)
            print(
                f"aewatch broker: the Kafka broker exited by itself (exit code "
                f"{broker._proc.returncode}); last log line: {broker._log_tail(1)}",
                file=sys.stderr,
                flush=True,
            )
            return 1
    return 0
