"""What the worker and the tools ask of a Kafka client, as typed protocols.

The worker talks to a `Source` (a consumer-group member: poll, keep-alive while busy, seek,
commit, log-end offsets, group metadata) and a `Sink` (send, flush, and for exactly-once output a
transaction that commits offsets with what was sent). Tools read a topic with a `Tail` (no group)
and write with a `Sink`. A `KafkaClient` makes all of them for one cluster and creates topics.

`pipeline.kafka_io.kafka_python` implements these with kafka-python; the in-memory fakes of the
tests implement them too. Records are anything with `topic, partition, offset, key, value,
headers, timestamp` (kafka-python's `ConsumerRecord` is one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

__all__ = [
    "KafkaClient",
    "Partition",
    "Record",
    "Rebalance",
    "Sink",
    "Source",
    "Tail",
    "TopicSpec",
    "record_columns",
]

Partition = tuple[str, int]
Headers = list[tuple[str, bytes]]
# {"num_partitions": n, "replication_factor": r, "topic_configs": {...}}, each optional
TopicSpec = Mapping[str, object]


class Record(Protocol):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    timestamp: int


def record_columns(records: Sequence[Record]) -> tuple[list, list, list]:
    """Keys, values and offsets of a partition's records, as three lists. A client whose poll
    returns its own sequence type may give them without making a record each (`columns()`)."""
    columns = getattr(records, "columns", None)
    if columns is not None:
        return columns()
    return [r.key for r in records], [r.value for r in records], [r.offset for r in records]


class Rebalance(Protocol):
    """The member's side of a rebalance: partitions given, taken away, or lost (evicted: no
    commit is possible for them any more)."""

    def on_assigned(self, partitions: set[Partition]) -> None: ...
    def on_revoked(self, partitions: set[Partition], *, lost: bool = False) -> None: ...


class Source(Protocol):
    """A consumer-group member with manual commits; rebalances call back into a `Rebalance`."""

    def poll(self, timeout_ms: int) -> Mapping[Partition, Sequence[Record]]: ...

    def keepalive(self) -> None:
        """Show the group this member is alive while it is busy, without taking records."""

    def seek(self, offsets: Mapping[Partition, int]) -> None:
        """Read these partitions again from these offsets (the next poll starts there)."""

    def commit(self, offsets: Mapping[Partition, int], *, wait: bool = True) -> None:
        """Commit the offset of the NEXT record to read, per partition; raises `CommitRejected`
        when the group refuses (the member was evicted or a rebalance is under way). With
        `wait=False` the commit is sent and not waited for: a refusal that comes back later (in a
        poll) is logged, and its partitions are handed out by `refused_commits`."""

    def refused_commits(self) -> set[Partition]:
        """The partitions of commits sent with `wait=False` that the group refused since the
        last call."""

    def highwaters(self, partitions: Iterable[Partition]) -> dict[Partition, int]:
        """The log-end offsets last seen, for the lag metric (partitions unknown left out)."""

    def group_metadata(self) -> object:
        """What a transaction sends with its offsets to fence a member that lost them."""

    def close(self) -> None: ...


class Sink(Protocol):
    """A producer. `flush` returns once every record sent is acknowledged, or raises
    `DeliveryError`. A transactional sink (`transactional` true) commits instead: what was sent
    since the last commit and the offsets given, atomically."""

    transactional: bool

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> None: ...

    def flush(self) -> None: ...

    def commit(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        """Transactional sinks only: commit what was sent and `offsets` as one transaction."""

    def abort(self) -> None:
        """Transactional sinks only: what was sent since the last commit is never seen."""

    def close(self) -> None: ...


class Tail(Protocol):
    """A reader of topics outside any group (alerts, the demo's event collector)."""

    def poll(self, timeout_ms: int) -> Mapping[Partition, Sequence[Record]]: ...
    def reached_end(self) -> bool:
        """Whether every partition of its topics has been read up to the end offset it has now
        (a topic that does not exist has nothing to read)."""

    def close(self) -> None: ...


class KafkaClient(Protocol):
    """One cluster, as the settings describe it: the factory of sources, sinks and tails."""

    def check(self) -> None:
        """Connect once: wrong credentials or an untrusted certificate fail here, with why."""

    def ping(self, request_timeout_ms: int = 5000) -> None:
        """One round trip to the cluster; raises whatever the client raises if it cannot."""

    def ensure_topics(self, topics: Mapping[str, TopicSpec]) -> None: ...

    def missing_topic(self, topic: str) -> bool:
        """Whether a record sent to `topic` has nowhere to go: the topic does not exist and the
        broker does not create topics on first use (`auto.create.topics.enable=false`). A broker
        that will not say how it is set is taken to create them."""

    def source(
        self, topics: Sequence[str], pattern: str | None, rebalance: Rebalance
    ) -> Source: ...

    def sink(
        self,
        *,
        max_record_bytes: int = 1_048_576,
        linger_ms: int = 1,
        transaction_timeout_ms: int | None = None,
    ) -> Sink:
        """A producer; with `transaction_timeout_ms`, a transactional one."""

    def tail(
        self, topics: Sequence[str], *, from_beginning: bool, read_committed: bool = False
    ) -> Tail: ...

    def read_all(self, topic: str) -> list[Record]:
        """Every record of a topic, from its start to its end when called."""

    def read_latest(self, topic: str, keys: Iterable[bytes] | None = None) -> dict[bytes, bytes]:
        """The latest value per key of a (compacted) topic, read from its start to its end."""


ClientFactory = Callable[..., KafkaClient]
