"""The aewatch exception tree. Catch the specific type where you can act on it.

AewatchError
├── ConfigError          a setting is invalid; raised at start-up, names the setting
├── DataError            input data cannot be used; names the file, column or row
├── ModelError           a detector artifact cannot be built, loaded or trusted
│   └── ArtifactError    the artifact on disk is malformed, tampered or from a newer format
├── CalibrationError     a threshold cannot be calibrated from the data given
├── RegistryError        the MLflow registry refused or lacks what was asked for
│   └── RegistryUnreachable  the tracking server could not be reached (not a missing version)
├── CommitRejected       the group refused an offset commit (this member was evicted)
├── DistributedError     a rank of a distributed training job failed; names the rank
└── BrokerError          the local Kafka broker could not be resolved, started or stopped
"""

from __future__ import annotations

__all__ = [
    "AewatchError",
    "ArtifactError",
    "BrokerError",
    "CalibrationError",
    "CommitRejected",
    "ConfigError",
    "DataError",
    "DistributedError",
    "ModelError",
    "RegistryError",
    "RegistryUnreachable",
    "one_line",
]


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line (a library's message may run over several: Arrow's,
    torch's, YAML's), cut at `limit` characters; its type's name when it has no message."""
    return " ".join((str(exc) or type(exc).__name__).split())[:limit]


class AewatchError(Exception):
    """Root of every error aewatch raises on purpose."""


class ConfigError(AewatchError):
    """A setting is invalid. The message starts with the setting's name."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class DataError(AewatchError):
    """Input data cannot be used; the message names the file, column or row."""


class ModelError(AewatchError):
    """A detector cannot be built, loaded or trusted."""


class ArtifactError(ModelError):
    """A detector artifact on disk is malformed, tampered with, or from a newer format.

    `reason` names the failed check for logs and metrics: manifest (the default),
    manifest_sha256, sha256, artifact_digest, weights, non_finite_weights."""

    def __init__(self, message: str, *, reason: str = "manifest") -> None:
        super().__init__(message)
        self.reason = reason


class CalibrationError(AewatchError):
    """A threshold cannot be calibrated from the data given. `more_data`: whether it is for too
    few (normal) windows, which another window length or split could give."""

    def __init__(self, message: str, *, more_data: bool = False) -> None:
        super().__init__(message)
        self.more_data = more_data


class RegistryError(AewatchError):
    """The model registry refused a request or lacks the model, version or alias asked for."""


class RegistryUnreachable(RegistryError):
    """The tracking server did not answer within the retry budget: says where and why, in one
    line, and is never taken for a missing model, version or alias."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"MLflow at {uri} is unreachable: {reason}")
        self.uri = uri
        self.reason = reason


class BrokerError(AewatchError):
    """The local Kafka broker could not be resolved, started or stopped."""


class CommitRejected(AewatchError):
    """The group refused an offset commit: the member was evicted or a rebalance is under way.
    Nothing is lost; the partitions are read again from the last accepted commit."""


class DistributedError(AewatchError):
    """A rank of a distributed training job failed; the job stopped every rank.

    The message names the rank and carries that rank's own error (`rank`, `error`)."""

    def __init__(self, rank: int, error: str) -> None:
        super().__init__(f"rank {rank} failed: {error}")
        self.rank = rank
        self.error = error
