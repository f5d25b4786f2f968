"""The worker's HTTP port: `/metrics`, `/healthz`, `/readyz` and the MLflow registry webhook.

- `GET /metrics`: Prometheus text format.
- `GET /healthz`: 200 while the scoring loop turns (it polled within `stall_s`), else 503.
- `GET /readyz`: 200 once a model serves and the member has joined its group and polls, else 503.
- `POST /webhooks/mlflow`: an MLflow webhook delivery, served only with a secret configured (or,
  unsigned, with `webhook_insecure`, which is warned about at start). The `X-MLflow-Signature`
  header must be `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` and the timestamp within five
  minutes; a delivery id seen within that window is acknowledged and ignored (a replay).
  `model_version_alias.created` for the served name and alias asks the model follower to check
  the registry now. Anything else is acknowledged and ignored.

What a hostile client can make it do is bounded: a missing, negative or non-numeric
`Content-Length` on a POST is a 411/400, a body over `MAX_BODY` a 413 before anything is read,
at most `max_connections` are served at once (others get a 503 and are closed), and a
connection serves one request and lasts at most `timeout_s` after it was accepted (checked every
`REAP_INTERVAL_S`), however slowly the client sends or reads: it is then shut down, so a slot is
free again within `timeout_s + REAP_INTERVAL_S` whatever its client does (every read and write
also has `timeout_s` as its socket timeout). To keep `/healthz` answering 503 busy, hostile
clients must therefore keep reconnecting. Handlers only read state the loop publishes and call
thread-safe methods.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import logging
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

from pipeline.errors import ConfigError

__all__ = ["MAX_BODY", "WorkerHttpServer", "verify_mlflow_signature"]

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20
SIGNATURE_TOLERANCE_S = 300
TIMEOUT_S = 10.0
MAX_CONNECTIONS = 32
REAP_INTERVAL_S = 0.5
_DIGITS = re.compile(r"[0-9]{1,9}")
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b'Content-Length: 16\r\nConnection: close\r\n\r\n{"error":"busy"}'
)


def verify_mlflow_signature(
    secret: str, delivery_id: str, timestamp: str, body: bytes, signature: str, *, now: float
) -> bool:
    try:
        version, encoded = signature.split(",", 1)
        age = abs(now - int(timestamp))
        given = encoded.strip().encode("ascii")
        signed = f"{delivery_id}.{timestamp}.".encode() + body
    except (ValueError, AttributeError, UnicodeError, OverflowError):  # (a timestamp of 400 digits)
        return False
    if version != "v1" or age > SIGNATURE_TOLERANCE_S:
        return False
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest())
    return hmac.compare_digest(expected, given)


class _Deliveries:
    """Delivery ids seen within the signature's tolerance: a second one is a replay. Each is
    kept as its digest, so `limit` of them take the same memory whatever their length."""

    def __init__(self, window_s: float = SIGNATURE_TOLERANCE_S, limit: int = 10_000) -> None:
        self.window_s, self.limit = window_s, limit
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, delivery_id: str, now: float) -> bool:
        delivery_id = hashlib.sha256(delivery_id.encode("utf-8", "surrogateescape")).digest()
        with self._lock:
            while self._seen and (
                len(self._seen) >= self.limit
                or next(iter(self._seen.values())) < now - 2 * self.window_s
            ):
                self._seen.popitem(last=False)
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
            return True


def check_bindable(host: str, port: int) -> None:
    """A `ConfigError` naming `http_host` or `http_port` if the endpoint cannot listen there
    (checked at start-up, before the worker connects to anything)."""
    try:
        with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            probe.bind((host, port))
    except OSError as exc:
        raise _bind_error(exc, host, port) from None


def _family(host: str) -> socket.AddressFamily:
    """The address family to listen on `host` with: IPv4 where the name has an IPv4 address,
    else the first it has (IPv6 for `::` or `::1`). A `socket.gaierror` if it has none."""
    infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    families = [info[0] for info in infos]
    return socket.AF_INET if socket.AF_INET in families else families[0]


def _bind_error(exc: OSError, host: str, port: int) -> ConfigError:
    if isinstance(exc, socket.gaierror):
        return ConfigError("http_host", f"{host!r} is not an address of this machine: {exc}")
    if exc.errno == errno.EADDRINUSE:
        return ConfigError("http_port", f"port {port} on {host} is in use by another process")
    if exc.errno == errno.EACCES:
        return ConfigError("http_port", f"port {port} on {host} needs privileges: {exc.strerror}")
    return ConfigError("http_host", f"cannot listen on {host}:{port}: {exc.strerror or exc}")


class _BoundedServer(ThreadingHTTPServer):
    """A threading server that serves at most `limit` connections at once, each for at most
    `lifetime_s` after it was accepted: a client that sends (or reads) a byte at a time within
    each read's timeout is cut off all the same, so its slot is free again."""

    daemon_threads = True

    def __init__(self, address, handler, limit: int, lifetime_s: float) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self._active = 0
        self._count = threading.Lock()
        self._lifetime_s = lifetime_s
        self._deadlines: dict[socket.socket, float] = {}  # under _count
        self.address_family = _family(address[0])
        super().__init__(address, handler)

    def service_actions(self) -> None:
        """Cut off connections past their deadline (serve_forever calls this at least every
        `REAP_INTERVAL_S`): shutting the socket down ends a blocked read or write at once. It
        stays registered until its handler closes it, so no closed descriptor is touched."""
        now = time.monotonic()
        with self._count:
            for sock, deadline in list(self._deadlines.items()):
                if deadline <= now:
                    del self._deadlines[sock]
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def shutdown_request(self, request) -> None:
        with self._count:
            self._deadlines.pop(request, None)
        super().shutdown_request(request)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._count:
            self._active += 1
            self._deadlines[request] = time.monotonic() + self._lifetime_s
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._count:
            self._active -= 1
        self._slots.release()

    def handle_error(self, request, client_address) -> None:
        log.debug("http: request from %s failed", client_address[0], exc_info=True)


class WorkerHttpServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Callable[[], bytes],
        live: Callable[[], tuple[bool, dict]],
        ready: Callable[[], tuple[bool, dict]],
        on_alias_created: Callable[[str, str, str], None] | None = None,
        webhook_secret: str | None = None,
        webhook_insecure: bool = False,
        timeout_s: float = TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        hook = on_alias_created if (webhook_secret or webhook_insecure) else None
        self.webhook = (
            "off" if hook is None else "signed" if webhook_secret else "unsigned (insecure)"
        )
        deliveries = _Deliveries()

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s
            protocol_version = "HTTP/1.0"  # one request a connection: its deadline is the request's

            def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
                log.debug("http: " + format, *args)

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if status >= 400 and self.command == "POST":
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, payload: dict) -> None:
                self._reply(status, orjson.dumps(payload), "application/json")

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, metrics(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, detail = (live if path == "/healthz" else ready)()
                    self._json(200 if ok else 503, {"ok": ok, **detail})
                else:
                    self._json(404, {"error": f"no such path {path}"})

            def _body(self) -> bytes | None:
                """The request's body, or None once a 4xx has been sent."""
                length = self.headers.get("Content-Length")
                if length is None:
                    self._json(411, {"error": "Content-Length required"})
                    return None
                if not _DIGITS.fullmatch(length.strip()):
                    big = length.strip().isdigit()
                    self._json(413 if big else 400, {"error": "bad Content-Length"})
                    return None
                if int(length) > MAX_BODY:
                    self._json(413, {"error": "body too large"})
                    return None
                try:
                    body = self.rfile.read(int(length))
                except TimeoutError:
                    self._json(408, {"error": "request timed out"})
                    return None
                if len(body) < int(length):
                    self.close_connection = True
                    return None
                return body

            def do_POST(self) -> None:  # noqa: N802
                if self.path.split("?", 1)[0] != "/webhooks/mlflow" or hook is None:
                    self._json(404, {"error": "no such path"})
                    return
                body = self._body()
                if body is None:
                    return
                now = time.time()
                delivery = self.headers.get("X-MLflow-Delivery-Id", "")
                if webhook_secret and not verify_mlflow_signature(
                    webhook_secret,
                    delivery,
                    self.headers.get("X-MLflow-Timestamp", ""),
                    body,
                    self.headers.get("X-MLflow-Signature", ""),
                    now=now,
                ):
                    log.warning("webhook delivery refused: bad or missing signature")
                    self._json(401, {"error": "bad signature"})
                    return
                try:
                    payload = orjson.loads(body)
                    entity, action = payload.get("entity"), payload.get("action")
                    data = payload.get("data") or {}
                    name, alias = str(data.get("name")), str(data.get("alias"))
                    version = str(data.get("version"))
                except (orjson.JSONDecodeError, AttributeError):
                    self._json(400, {"error": "not a JSON webhook payload"})
                    return
                if delivery and not deliveries.first(delivery, now):
                    log.info("webhook delivery %r seen before: ignored", delivery[:64])
                    self._json(200, {"ok": True, "duplicate": True})
                    return
                if (entity, action) == ("model_version_alias", "created"):
                    hook(name, alias, version)
                self._json(200, {"ok": True})

        try:
            self.httpd = _BoundedServer((host, port), Handler, max_connections, timeout_s)
        except OSError as exc:
            raise _bind_error(exc, host, port) from None
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": REAP_INTERVAL_S},
            name="aewatch-http",
            daemon=True,
        )
        if webhook_insecure and not webhook_secret and on_alias_created is not None:
            log.warning(
                "the registry webhook accepts unsigned deliveries (webhook_insecure): anyone "
                "who reaches port %d can make the worker check the registry",
                self.port,
            )

    def active_connections(self) -> int:
        """Connections being served now (at most `max_connections`)."""
        return self.httpd._active

    def start(self) -> WorkerHttpServer:
        self._thread.start()
        log.info(
            "metrics, health and webhook endpoint on port %d (webhook %s)", self.port, self.webhook
        )
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
