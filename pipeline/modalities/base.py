"""What every input modality provides, as protocols.

A modality (series of readings, images) is bound to a detector's `InputSpec` and owns everything
that depends on the kind of input, so that no other module asks which kind it serves:

- `intake`: how a poll's Kafka records become windows ready to score (decoding, checking,
  windowing per key) and which records are rejected, with what reason;
- `event_details`: what the anomaly events say about some of a batch's scored windows (each
  one's time span and top features, or an image's error map and hottest regions);
- `alarm_features` / `alarm_errors`: the feature names and per-feature errors alarm episodes
  summarise (none for images);
- `mismatch`: why a candidate detector could not take over the serving one's inputs;
- `score_rows`: how a table of rows (the MLflow pyfunc's input) is scored;
- `version_tags` and `example_rows`: what a registered version says about its input, and an
  input example in the pyfunc's row format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # the detector module loads torch
    import pandas as pd

    from pipeline.detector import Detector, InputSpec, Scores
    from pipeline.kafka_io.protocols import Record
    from pipeline.modalities.readings import Rejection
    from pipeline.modalities.windowing import ReadyWindows

__all__ = ["Intake", "Modality", "Reject", "StreamWindows"]

Partition = tuple[str, int]
Reject = Callable[["Record", "Rejection"], None]


class StreamWindows(Protocol):
    """The per-key stream state an intake keeps between polls, and how it survives a restart
    (see `pipeline.modalities.windowing`)."""

    def state(self, partition: Partition) -> dict:
        """JSON-ready resume points of the partition's keys, saved at each checkpoint."""

    def restore(self, partition: Partition, saved: dict) -> None: ...

    def oldest_needed(self, partition: Partition) -> int | None:
        """The smallest offset of the partition a future window still needs (None if none)."""

    def expire(self, partition: Partition) -> list[str]:
        """Forget the partition's keys silent for long (`pipeline.modalities.expiry`): their
        names, for the other stages to drop."""

    def drop(self, partition: Partition, keys) -> None: ...

    def forget(self, partitions: set[Partition]) -> None: ...

    def parts(self) -> dict:
        """Every holder of this per-key state (a `pipeline.worker.state.KeyedState`), by its
        name in the state record: this one as `resume`, and any others it keeps."""


class Intake(Protocol):
    """Turns one partition's records (`take`), or a poll's of several (`take_all`, in one pass
    where it can), into ready windows; rejected records go to `reject`."""

    windows: StreamWindows

    def take_all(
        self,
        polled: Sequence[tuple[Partition, Sequence[Record]]],
        pending: ReadyWindows,
        reject: Reject,
    ) -> None: ...

    def take(
        self,
        partition: Partition,
        records: Sequence[Record],
        pending: ReadyWindows,
        reject: Reject,
    ) -> None: ...


class Modality(Protocol):
    spec: InputSpec

    def intake(self, max_record_bytes: int, reread_max: int, **clock) -> Intake: ...

    def event_details(
        self, scored: Scores, rows: np.ndarray, start_ms: np.ndarray, end_ms: np.ndarray
    ) -> list[dict]:
        """For each of the `rows` of `scored` (spanning `start_ms` to `end_ms`), the fields
        its event's data adds."""

    @property
    def alarm_features(self) -> tuple[str, ...] | None: ...

    def alarm_errors(self, scored: Scores) -> np.ndarray | None: ...

    def mismatch(self, candidate: InputSpec) -> tuple[str, str] | None:
        """(reason, detail) if a detector with `candidate` inputs cannot take these inputs over."""

    def score_rows(self, detector: Detector, rows: pd.DataFrame) -> pd.DataFrame: ...

    def version_tags(self) -> dict[str, str]: ...

    def example_rows(self, sample: np.ndarray) -> pd.DataFrame: ...
