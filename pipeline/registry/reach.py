"""Whether the tracking server can be reached, decided quickly and said in one line.

MLflow's HTTP client retries a refused connection for minutes before it raises, and its errors
do not tell a server that is down from a model that is missing. Every registry reader and the
training side's tracking ask `probe` first: a TCP connection to an `http(s)` tracking URI, each
attempt within `CONNECT_TIMEOUT_S`, retried with growing waits for the retry budget (15 s unless
the command line sets another with `set_retry_budget`); after that a `RegistryUnreachable`
"MLflow at URI is unreachable: reason". `unreachable_error` turns an error MLflow raised later
into the same when it is a network error, so an outage is never reported as a missing version.
`client_environment` gives the values of MLflow's own retry variables that fit the same budget
(the command line writes them; nothing here touches the environment).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import RegistryError, RegistryUnreachable
from pipeline.uris import mask_uri

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_RETRY_BUDGET_S",
    "check_uri",
    "client_environment",
    "default_tracking_uri",
    "probe",
    "retry_budget",
    "set_retry_budget",
    "unreachable_error",
    "uri_problem",
]

CONNECT_TIMEOUT_S = 3.0
DEFAULT_RETRY_BUDGET_S = 15.0
_budget = [DEFAULT_RETRY_BUDGET_S]
_NETWORK_WORDS = (
    "Max retries exceeded",
    "Connection refused",
    "Failed to establish a new connection",
    "Name or service not known",
    "Temporary failure in name resolution",
    "timed out",
    "Connection reset",
    "Connection aborted",
    "RemoteDisconnected",
)


# schemes (before a `+driver`) of the stores MLflow's registry opens, besides its file store
_STORES = (
    "http",
    "https",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "databricks",
    "databricks-uc",
    "uc",
)


def default_tracking_uri(directory: Path | None = None) -> str:
    """Where every command looks without `--tracking-uri` or MLFLOW_TRACKING_URI: a local sqlite
    store in `directory` (the working directory by default)."""
    return f"sqlite:///{(directory or Path.cwd()).resolve() / 'mlflow.db'}"


def uri_problem(uri: str | None) -> str | None:
    """Why MLflow opens no registry at a tracking URI (None when it does, or for no URI): a
    scheme it does not know, or a folder (its file store, which MLflow 3 refuses by default and
    aewatch does not use). No I/O."""
    if not uri:
        return None
    try:
        scheme = urlsplit(uri).scheme.lower().split("+")[0]
    except ValueError as exc:
        return f"not a URI ({exc})"
    use = "use sqlite:///PATH.db, http(s)://HOST:PORT, postgresql://, mysql:// or mssql://"
    if scheme in ("", "file"):
        return f"a folder is MLflow's file store, which aewatch does not use; {use}"
    if scheme not in _STORES:
        return f"no MLflow store has the scheme {scheme!r}; {use}"
    return None


def check_uri(uri: str | None) -> None:
    """`RegistryError` in one line for a tracking URI with a `uri_problem`."""
    problem = uri_problem(uri)
    if problem is not None:
        raise RegistryError(f"tracking URI {mask_uri(uri)!r}: {problem}")


def set_retry_budget(seconds: float) -> None:
    """How long `probe` keeps trying (the command line's `--registry-retry-s`)."""
    _budget[0] = float(seconds)


def retry_budget() -> float:
    return _budget[0]


def client_environment(budget_s: float) -> dict[str, str]:
    """MLflow's retry variables for requests after the probe: retries whose waits (a factor
    times 2, 4, ...) add up to about `budget_s`; none for a budget under 2 s."""
    if budget_s < 2:
        return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    retries = 3 if budget_s >= 6 else 1
    waits = sum(2**i for i in range(1, retries))  # urllib3 waits 0, 2f, 4f, ...
    factor = max(0.5, (budget_s - retries) / max(waits, 1))
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": f"{factor:g}",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    }


def _address(uri: str | None) -> tuple[str, int] | None:
    if not uri:
        return None
    try:
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"host name not resolved ({exc.strerror or exc})"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _sqlite_file(uri: str | None) -> Path | None:
    """The database file of a `sqlite:///PATH` tracking URI (None for any other URI)."""
    if not uri or not uri.lower().startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def probe(uri: str | None, budget_s: float | None = None, *, create: bool = False) -> None:
    """Return once the tracking server at `uri` accepts a connection (at once for a database
    or no URI); `RegistryUnreachable` when it did not within the budget, `RegistryError` for a
    URI MLflow cannot open (`check_uri`), or, unless `create` (the training side, which
    writes), for a sqlite file that does not exist: MLflow would make an empty store there and
    report what is asked for as missing from it."""
    check_uri(uri)
    database = _sqlite_file(uri)
    if database is not None and not create and not database.is_file():
        raise RegistryError(
            f"tracking URI {mask_uri(uri)!r}: no MLflow store at {database} (a store is made "
            "by `aewatch train --register`)"
        )
    address = _address(uri)
    if address is None:
        return
    budget = retry_budget() if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    delay = 0.5
    while True:
        try:
            with socket.create_connection(address, timeout=CONNECT_TIMEOUT_S):
                return
        except OSError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RegistryUnreachable(mask_uri(uri), _reason(exc)) from None
            time.sleep(min(delay, left))
            delay = min(delay * 2, 4.0)


def _is_network(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | TimeoutError | socket.gaierror):
            return True
        name = type(current).__name__
        if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "NewConnectionError"):
            return True
        if any(word in str(current) for word in _NETWORK_WORDS):
            return True
        current = current.__cause__ or current.__context__
    return False


def unreachable_error(uri: str | None, exc: BaseException) -> RegistryUnreachable | None:
    """The one-line error for `exc` when it is a network error reaching `uri`, else None."""
    if not _is_network(exc):
        return None
    texts, current = [], exc
    while current is not None and len(texts) < 10:
        texts.append(str(current))
        current = current.__cause__ or current.__context__
    text = " ".join(texts)
    reason = "connection failed"
    for word in _NETWORK_WORDS[1:]:
        if word in text:
            reason = word.lower()
            break
    return RegistryUnreachable(mask_uri(uri or "(default tracking URI)"), reason)
