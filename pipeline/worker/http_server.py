"""The worker's HTTP port: `/metrics`, `/healthz`, `/readyz` and the MLflow registry webhook.

- `GET /metrics`: Prometheus text format.
- `GET /healthz`: 200 while the scoring loop turns (it polled within `stall_s`), else 503.
- `GET /readyz`: 200 once a model serves and the member has joined its group and polls, else 503.
- `POST /webhooks/mlflow`: an MLflow webhook delivery. With a secret configured, the
  `X-MLflow-Signature` header must be `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` and the
  timestamp within five minutes; `model_version_alias.created` for the served name and alias asks
  the model follower to check the registry now. Anything else is acknowledged and ignored.

The server runs on daemon threads; handlers only read state the loop publishes and call
thread-safe methods.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["WorkerHttpServer", "verify_mlflow_signature"]

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20
SIGNATURE_TOLERANCE_S = 300


def verify_mlflow_signature(
    secret: str, delivery_id: str, timestamp: str, body: bytes, signature: str, *, now: float
) -> bool:
    try:
        version, encoded = signature.split(",", 1)
        age = abs(now - int(timestamp))
    except (ValueError, AttributeError):
        return False
    if version != "v1" or age > SIGNATURE_TOLERANCE_S:
        return False
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest())
    return hmac.compare_digest(expected.decode(), encoded.strip())


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
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
                log.debug("http: " + format, *args)

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
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

            def do_POST(self) -> None:  # noqa: N802
                if self.path.split("?", 1)[0] != "/webhooks/mlflow" or on_alias_created is None:
                    self._json(404, {"error": "no such path"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self._json(413, {"error": "body too large"})
                    return
                body = self.rfile.read(length)
                if webhook_secret and not verify_mlflow_signature(
                    webhook_secret,
                    self.headers.get("X-MLflow-Delivery-Id", ""),
                    self.headers.get("X-MLflow-Timestamp", ""),
                    body,
                    self.headers.get("X-MLflow-Signature", ""),
                    now=time.time(),
                ):
                    log.warning("webhook delivery refused: bad or missing signature")
                    self._json(401, {"error": "bad signature"})
                    return
                try:
                    payload = orjson.loads(body)
                    entity, action = payload.get("entity"), payload.get("action")
                    data = payload.get("data") or {}
                except (orjson.JSONDecodeError, AttributeError):
                    self._json(400, {"error": "not a JSON webhook payload"})
                    return
                if (entity, action) == ("model_version_alias", "created"):
                    on_alias_created(
                        str(data.get("name")), str(data.get("alias")), str(data.get("version"))
                    )
                self._json(200, {"ok": True})

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="aewatch-http", daemon=True
        )

    def start(self) -> WorkerHttpServer:
        self._thread.start()
        log.info("metrics, health and webhook endpoint on port %d", self.port)
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
