"""Following a registry alias: new model versions load in the background and swap in between
two batches, without a restart.

A `ModelFollower` thread asks the registry which version the alias (`models:/NAME@champion`)
points to every `reload_interval_s` seconds, or at once when the MLflow webhook
`model_version_alias.created` arrives for that name and alias. A new version is:

1. downloaded, and its weights' SHA-256 checked against the version's `aewatch.weights_sha256` tag;
2. loaded (manifest format version, calibrated threshold) and checked against the serving model:
   same input kind, the same features in the same order and the same window (or image shape),
   so the open windows and the input topics stay valid;
3. one the worker can serve with its settings (`accepts`: per-key baselines need a standard
   scaler), warmed up on the latest scored windows (zeros before any), which must give finite
   scores.

A version that passes waits in a slot until the loop takes it between two batches; one that fails
is refused, logged with the reason, counted in `aewatch_model_reloads_total{outcome="refused"}`
and not tried again while the alias stays on it (moved away and back, it is tried again). A
download that fails for want of local room or resources (a full disk) is `failed` and tried again
at the next look. An unreachable registry is retried with exponential backoff (doubling from 1 s,
or a quarter of the cap, up to the interval); a registry that answers but has no such alias (or
model) any more is `missing`, looked at again each interval. Meanwhile the current model keeps
serving.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
from collections.abc import Callable

import numpy as np

from pipeline.detector import Detector
from pipeline.errors import AewatchError, ConfigError, RegistryError, RegistryUnreachable
from pipeline.modalities import modality_of
from pipeline.registry.client import ModelRef, alias_version, load_model, parse_model_uri
from pipeline.registry.reach import probe

__all__ = ["ModelFollower", "check_compatible"]

log = logging.getLogger(__name__)
WARMUP_WINDOWS = 64
# local conditions a later attempt may not meet: the version is not to blame
TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.EAGAIN}
)


class Refused(AewatchError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def check_compatible(serving: Detector, candidate: Detector) -> None:
    """Raise `Refused` if the candidate cannot take the serving model's inputs: the same kind of
    input, and what its modality requires to stay the same (features and window, image shape)."""
    old, new = serving.input, candidate.input
    if old.kind != new.kind:
        raise Refused("manifest", f"input kind {new.kind!r}, serving {old.kind!r}")
    mismatch = modality_of(old).mismatch(new)
    if mismatch is not None:
        raise Refused(*mismatch)


def warm_up(candidate: Detector, sample: np.ndarray | None) -> None:
    if sample is None or len(sample) == 0:
        sample = np.zeros((4, *candidate.input.sample_shape), np.float32)
    scores = candidate.score(sample[:WARMUP_WINDOWS]).scores
    threshold = candidate.threshold.value
    if not np.isfinite(scores).all() or threshold is None or not np.isfinite(threshold):
        bad = int((~np.isfinite(scores)).sum())
        raise Refused("warmup", f"{bad} of {len(scores)} warm-up scores are not finite")


class ModelFollower:
    """Watches one registry alias; `take()` hands over a checked new version once."""

    def __init__(
        self,
        uri: str,
        serving: Detector,
        serving_ref: ModelRef,
        *,
        tracking_uri: str | None,
        device: str,
        interval_s: float,
        on_outcome: Callable[[str, str], None] = lambda outcome, reason: None,
        max_backoff_s: float | None = None,
    ) -> None:
        parsed = parse_model_uri(uri)
        if parsed is None or parsed[1] is None:
            raise ValueError(f"{uri}: only an alias (models:/NAME@ALIAS) can be followed")
        self.name, self.alias = parsed[0], parsed[1]
        self.tracking_uri, self.device = tracking_uri, device
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s or max(1.0, interval_s)
        self.on_outcome = on_outcome
        # raises `ConfigError` for a detector the worker's settings cannot serve (set by it)
        self.accepts: Callable[[Detector], None] = lambda detector: None
        self.serving = serving
        self.serving_version = serving_ref.version
        self.refused: dict[str, str] = {}
        self.sample: np.ndarray | None = None  # latest scored windows, set by the loop
        self._ready: tuple[Detector, ModelRef] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="aewatch-reload", daemon=True)

    # -- the loop's side -------------------------------------------------------------------------
    def start(self) -> ModelFollower:
        self._thread.start()
        return self

    def take(self) -> tuple[Detector, ModelRef] | None:
        if self._ready is None:
            return None
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            self.serving = ready[0]
        return ready

    def trigger(self, name: str, alias: str, version: str) -> None:
        """The webhook's entry: check now if it concerns the alias served."""
        if name == self.name and alias == self.alias:
            log.info("webhook: %s@%s moved to version %s", name, alias, version)
            self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        delay, backoff = self.interval_s, 0.0
        while not self._stop.is_set():
            self._wake.wait(timeout=delay if delay > 0 else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check()
            except RegistryUnreachable as exc:
                first = min(1.0, self.max_backoff_s / 4)
                backoff = min(self.max_backoff_s, backoff * 2 if backoff else first)
                delay = backoff
                self.on_outcome("unreachable", "registry")
                log.warning(
                    "registry unreachable (%s); serving %s, retry in %.3gs",
                    exc,
                    self.serving_version,
                    delay,
                )
                continue
            except RegistryError as exc:  # it answers, but the alias (or the model) is gone
                self.on_outcome("missing", "alias")
                log.warning(
                    "%s@%s cannot be followed (%s); still serving version %s",
                    self.name,
                    self.alias,
                    str(exc).splitlines()[0],
                    self.serving_version,
                )
            delay, backoff = self.interval_s, 0.0

    def check(self) -> str:
        """One look at the registry; returns what happened (for logs and tests)."""
        probe(self.tracking_uri, budget_s=0.0)  # one attempt: the follower paces its retries
        version = alias_version(self.name, self.alias, tracking_uri=self.tracking_uri)
        # a refusal holds while the alias stays on its version
        self.refused = {v: why for v, why in self.refused.items() if v == version}
        if version == self.serving_version or version in self.refused:
            return "unchanged"
        if self._ready is not None and self._ready[1].version == version:
            return "pending"
        try:
            detector, ref = load_model(
                f"models:/{self.name}/{version}",
                tracking_uri=self.tracking_uri,
                device=self.device,
                require_calibrated=True,
            )
            check_compatible(self.serving, detector)
            try:
                self.accepts(detector)
            except ConfigError as exc:
                raise Refused(exc.setting, exc.problem) from exc
            warm_up(detector, self.sample)
        except RegistryUnreachable:  # retried later, not refused
            raise
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS:
                return self._refuse(version, type(exc).__name__, exc)
            self.on_outcome("failed", errno.errorcode.get(exc.errno, "OSError"))
            log.warning(
                "%s version %s could not be loaded here (%s); tried again in the next look, "
                "still serving version %s",
                self.name,
                version,
                exc,
                self.serving_version,
            )
            return "failed"
        except (AewatchError, ValueError, RuntimeError) as exc:
            reason = "registry" if isinstance(exc, RegistryError) else None
            return self._refuse(version, reason or getattr(exc, "reason", type(exc).__name__), exc)
        ref = dataclasses.replace(ref, alias=self.alias)
        with self._lock:
            self._ready = (detector, ref)
        self.serving_version = version
        log.info("%s version %s checked and ready to serve", self.name, version)
        return "ready"

    def _refuse(self, version: str, reason: str, exc: BaseException) -> str:
        self.refused[version] = reason
        self.on_outcome("refused", reason)
        log.warning(
            "refused %s version %s (%s): %s; still serving version %s",
            self.name,
            version,
            reason,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            self.serving_version,
        )
        return "refused"
