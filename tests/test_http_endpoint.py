"""The worker's HTTP endpoint as a hostile client sees it: malformed lengths and signatures get
a 4xx, bodies are read only up to the limit, slow clients time out, the handler threads are
bounded, unsigned webhooks are off unless asked for, replays are ignored, and a fuzzed stream of
requests leaves the server answering with bounded memory."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import socket
import threading
import time
from pathlib import Path

import orjson
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.worker.http_server import (
    MAX_BODY,
    WorkerHttpServer,
    check_bindable,
    verify_mlflow_signature,
)
from pipeline.worker.settings import WorkerSettings

SECRET = "hook-secret"
PATH = "/webhooks/mlflow"


class Triggers(list):
    def __call__(self, name: str, alias: str, version: str) -> None:
        self.append((name, alias, version))


def serve(**kwargs) -> tuple[WorkerHttpServer, Triggers]:
    triggers = Triggers()
    options = {"webhook_secret": SECRET, **kwargs}
    server = WorkerHttpServer(
        "127.0.0.1",
        0,
        metrics=lambda: b"",
        live=lambda: (True, {}),
        ready=lambda: (True, {}),
        on_alias_created=triggers,
        **options,
    ).start()
    return server, triggers


def signed(body: bytes, delivery: str = "d-1", secret: str = SECRET) -> dict[str, str]:
    stamp = str(int(time.time()))
    digest = hmac.new(secret.encode(), f"{delivery}.{stamp}.".encode() + body, hashlib.sha256)
    return {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": "v1," + base64.b64encode(digest.digest()).decode(),
    }


ALIAS = orjson.dumps(
    {
        "entity": "model_version_alias",
        "action": "created",
        "data": {"name": "m", "alias": "champion", "version": "2"},
    }
)


def raw(port: int, request: bytes, *, timeout: float = 5.0) -> bytes:
    """Send `request` as is and read the reply until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def status_of(reply: bytes) -> int | None:
    try:
        return int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def post(port: int, headers: dict[str, str], body: bytes = b"") -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return raw(port, f"POST {PATH} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode("latin-1") + body)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "-0x10", " ", "99999999999999999999999"])
def test_a_negative_or_non_numeric_content_length_is_a_400_without_reading_the_body(length):
    server, triggers = serve()
    try:
        started = time.monotonic()
        # The client sends a little and keeps the connection open: nothing may wait for more.
        reply = post(server.port, {"Content-Length": length, "Connection": "close"}, b"x" * 64)
        assert status_of(reply) in (400, 413), reply[:200]
        assert time.monotonic() - started < 2.0
        assert triggers == []
    finally:
        server.close()


def test_a_body_is_read_only_up_to_the_limit():
    server, _ = serve()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n"
            sock.sendall(head.encode())
            reply = sock.recv(4096)
        assert status_of(reply) == 413
    finally:
        server.close()


def test_a_slow_client_is_dropped_after_the_connection_timeout(caplog):
    server, _ = serve(timeout_s=0.5)
    try:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode())
            sock.sendall(b"{")  # and then nothing
            reply = sock.recv(4096)
            assert reply == b"" or status_of(reply) == 408
        assert time.monotonic() - started < 5.0
    finally:
        server.close()


def test_the_handler_threads_are_bounded_and_the_endpoint_recovers():
    # (idle connections time out after 10 s: not before the refusal is seen on a slow machine;
    # closing them ends their handlers at once)
    server, _ = serve(timeout_s=10.0, max_connections=4)
    idle = []
    try:
        for _ in range(12):  # connections that send nothing hold a thread each
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        time.sleep(0.3)
        assert server.active_connections() <= 4
        refused = requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
        assert refused.status_code == 503
    finally:
        for sock in idle:
            sock.close()
    try:
        deadline = time.monotonic() + 5
        while server.active_connections() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200
    finally:
        server.close()


def trickle(port: int, first: bytes, each: bytes, stop: threading.Event) -> None:
    """A client that sends `first`, then `each` every 0.2 s (well within any read timeout)
    until stopped or the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(first)
            while not stop.wait(0.2):
                sock.sendall(each)
        except OSError:
            pass  # the server closed it


@pytest.mark.parametrize(
    ("first", "each"),
    [(b"GET /healthz HTTP/1.1\r\n", b"X: y\r\n"), (b"GET /", b"a")],
    ids=["header lines", "request line"],
)
def test_clients_trickling_a_request_lose_their_slot_after_the_timeout(first, each):
    # Each byte comes well within the 1 s read timeout; the request as a whole may not take
    # longer than that, so /healthz answers again once the trickling clients are cut off.
    server, _ = serve(timeout_s=1.0, max_connections=2)
    stop = threading.Event()
    clients = [
        threading.Thread(target=trickle, args=(server.port, first, each, stop), daemon=True)
        for _ in range(2)
    ]
    try:
        for client in clients:
            client.start()
        time.sleep(0.3)
        assert server.active_connections() == 2
        deadline = time.monotonic() + 4.0
        status = None
        while status != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            status = requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code
        assert status == 200, "the trickling clients still hold every slot"
        for client in clients:
            client.join(timeout=1.0)
            assert not client.is_alive(), "the server kept a trickling connection open"
    finally:
        stop.set()
        server.close()


@pytest.mark.parametrize("signature", ["v1,ü", "v1,\u00ff\u00fe", "v1", "", "v2,abc", "v1,=" * 50])
def test_a_malformed_signature_is_a_401_not_a_traceback(signature, capfd):
    server, triggers = serve()
    try:
        headers = {**signed(ALIAS), "X-MLflow-Signature": signature}
        headers["Content-Length"] = str(len(ALIAS))
        reply = post(server.port, {**headers, "Connection": "close"}, ALIAS)
        assert status_of(reply) == 401
        assert triggers == []
    finally:
        server.close()
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("stamp", ["9" * 400, "-" + "9" * 400, "1" + "0" * 309])
def test_a_timestamp_too_large_for_a_float_is_a_401(stamp, capfd):
    assert not verify_mlflow_signature(SECRET, "d-1", stamp, ALIAS, "v1,abc", now=time.time())
    server, triggers = serve()
    try:
        headers = {**signed(ALIAS), "X-MLflow-Timestamp": stamp}
        headers["Content-Length"] = str(len(ALIAS))
        reply = post(server.port, {**headers, "Connection": "close"}, ALIAS)
        assert status_of(reply) == 401, reply[:200]
        assert triggers == []
    finally:
        server.close()
    assert "Traceback" not in capfd.readouterr().err


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("host", ["::1", "::"])
def test_an_ipv6_http_host_is_listened_on(host):
    check_bindable(host, 0)
    server = WorkerHttpServer(
        host, 0, metrics=lambda: b"", live=lambda: (True, {}), ready=lambda: (True, {})
    ).start()
    try:
        with socket.create_connection(("::1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(sock.recv(4096)) == 200
    finally:
        server.close()


def test_the_webhook_is_off_without_a_secret():
    server, triggers = serve(webhook_secret=None)
    try:
        url = f"http://127.0.0.1:{server.port}{PATH}"
        assert requests.post(url, data=ALIAS, timeout=5).status_code == 404
        assert triggers == []
    finally:
        server.close()


def test_an_insecure_webhook_is_asked_for_and_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.worker.http_server"):
        server, triggers = serve(webhook_secret=None, webhook_insecure=True)
    try:
        url = f"http://127.0.0.1:{server.port}{PATH}"
        assert requests.post(url, data=ALIAS, timeout=5).status_code == 200
        assert triggers == [("m", "champion", "2")]
    finally:
        server.close()
    assert any("unsigned" in r.getMessage() for r in caplog.records)


def test_the_insecure_webhook_is_a_setting_and_conflicts_with_a_secret():
    assert WorkerSettings.build(
        model="m", bootstrap_servers="b:9092", input_topic=("t",), webhook_insecure=True
    ).http.webhook_insecure
    with pytest.raises(ConfigError, match="webhook_insecure"):
        WorkerSettings.build(
            model="m",
            bootstrap_servers="b:9092",
            input_topic=("t",),
            webhook_insecure=True,
            webhook_secret="s",
        )


def test_a_replayed_delivery_is_acknowledged_and_ignored():
    server, triggers = serve()
    try:
        url = f"http://127.0.0.1:{server.port}{PATH}"
        headers = signed(ALIAS, delivery="delivery-7")
        first = requests.post(url, data=ALIAS, headers=headers, timeout=5)
        again = requests.post(url, data=ALIAS, headers=headers, timeout=5)
        other = requests.post(url, data=ALIAS, headers=signed(ALIAS, "delivery-8"), timeout=5)
        assert (first.status_code, again.status_code, other.status_code) == (200, 200, 200)
        assert again.json().get("duplicate") is True
        assert len(triggers) == 2, "the replay woke nothing"
    finally:
        server.close()


def test_the_replay_cache_holds_long_delivery_ids_in_bounded_memory():
    """Delivery ids are as long as a header line may be (64 KiB): 10,000 of them were kept
    whole, about 600 MiB for an unsigned webhook that anyone can post to."""
    import tracemalloc

    from pipeline.worker.http_server import _Deliveries

    deliveries = _Deliveries(limit=200)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(200):
        assert deliveries.first(f"{i:06d}" + "x" * 60_000, float(i))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert held < 200 * 1_000, f"{held:,} bytes for 200 ids"
    assert not deliveries.first("000007" + "x" * 60_000, 300.0), "a replay is still one"


header_text = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\r\n:"),
    max_size=40,
)
requests_st = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["POST", "GET", "PUT", "POST"]),
        "path": st.sampled_from([PATH, "/metrics", "/healthz", "/x", PATH + "?a=b"]),
        "length": st.one_of(
            st.none(),
            st.integers(-(2**40), 2**40).map(str),
            header_text,
            st.sampled_from(["-1", str(MAX_BODY), str(MAX_BODY + 1), "0"]),
        ),
        "headers": st.dictionaries(
            st.sampled_from(
                ["X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id", "X-Other"]
            ),
            header_text,
            max_size=4,
        ),
        "body": st.binary(max_size=2048),
    }
)


FUZZ = {"requests": 0, "peak_rss_growth_kib": 0}


def test_fuzzed_requests_leave_the_server_answering_with_bounded_memory(capfd):
    server, triggers = serve(timeout_s=0.3)
    before = rss_kib()

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=requests_st)
    def one(request):
        headers = {"Host": "x", "Connection": "close", **request["headers"]}
        if request["length"] is not None:
            headers["Content-Length"] = request["length"]
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        line = f"{request['method']} {request['path']} HTTP/1.1\r\n{head}\r\n"
        reply = raw(server.port, line.encode("latin-1") + request["body"], timeout=3)
        assert reply == b"" or status_of(reply) in {200, 400, 401, 404, 408, 411, 413, 501, 503}
        FUZZ["requests"] += 1
        FUZZ["peak_rss_growth_kib"] = max(FUZZ["peak_rss_growth_kib"], rss_kib() - before)

    try:
        one()
        health = requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
        assert health.status_code == 200
    finally:
        server.close()
    assert "Traceback" not in capfd.readouterr().err
    with capfd.disabled():
        print(
            f"\nendpoint fuzz: {FUZZ['requests']} requests, peak RSS growth {FUZZ['peak_rss_growth_kib']} KiB"
        )
    assert FUZZ["requests"] >= 400
    assert FUZZ["peak_rss_growth_kib"] < 4 * MAX_BODY // 1024 + 16 * 1024
    assert triggers == [], "no unsigned request woke the follower"
