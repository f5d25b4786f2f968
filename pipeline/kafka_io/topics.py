"""What a topic spec asks of the cluster, and bringing an existing topic's settings in line.

A spec (`TopicSpec`) is `{"num_partitions": n, "replication_factor": r, "topic_configs": {...}}`,
each part optional. A missing count takes the broker's default (`num.partitions`,
`default.replication.factor`), so that a cluster of three brokers replicates what aewatch creates
as it replicates everything else. `topic_configs` are the settings a topic needs to work as aewatch
uses it: the state topic compacted and taking large records, the feedback topic compacted.

Both clients create a missing topic with its settings, and give an existing one the settings it
lacks (`settle`): a topic created before a setting was asked for, or by hand. A setting that was
set on the topic itself to another value is the operator's choice and is kept, with a warning.

Reading a compacted topic's latest values (`read_latest`, the worker's state) with read_committed
stops at the last stable offset: a transaction left open, by a worker killed between sending its
state and committing and not back under its transactional id, hides every record written after
its first, newer committed state among them, until the broker aborts it. So the read waits until
the transactions open when it began are over (`SETTLE_S` at most: the worker's transaction
timeout and the broker's check for timed-out transactions).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from pipeline.kafka_io.protocols import TopicSpec

__all__ = [
    "BROKER_DEFAULT",
    "SETTLE_S",
    "configs",
    "partitions",
    "replication",
    "settle",
    "settle_existing",
    "settled",
]

log = logging.getLogger(__name__)
BROKER_DEFAULT = -1  # a count the broker chooses (Kafka >= 2.4)
SETTLE_S = 75.0  # the longest wait for open transactions (60 s, and 10 s until the broker looks)
SETTLE_POLL_S = 0.2

# name -> (value, whether it was set on the topic itself rather than inherited from the broker)
Current = Mapping[str, tuple[str | None, bool]]


def partitions(spec: TopicSpec) -> int:
    return int(spec.get("num_partitions", BROKER_DEFAULT))  # type: ignore[call-overload]


def replication(spec: TopicSpec) -> int:
    return int(spec.get("replication_factor", BROKER_DEFAULT))  # type: ignore[call-overload]


def configs(spec: TopicSpec) -> dict[str, str]:
    return {str(k): str(v) for k, v in dict(spec.get("topic_configs", {})).items()}  # type: ignore[call-overload]


def missing(topic: str, wanted: Mapping[str, str], current: Current) -> dict[str, str]:
    """The settings of `wanted` that `topic` lacks and may be given. One the topic inherits from
    the broker is given; one set on the topic to another value is kept, with a warning."""
    lacking = {}
    for name, value in wanted.items():
        have, on_topic = current.get(name, (None, False))
        if have == value:
            continue
        if on_topic:
            log.warning(
                "topic %s keeps its own %s=%s (aewatch creates it with %s)",
                topic,
                name,
                have,
                value,
            )
        else:
            lacking[name] = value
    return lacking


def settle(
    topic: str,
    wanted: Mapping[str, str],
    read: Callable[[str, Iterable[str]], Current],
    write: Callable[[str, Mapping[str, str]], None],
) -> dict[str, str]:
    """Give the existing `topic` the settings of `wanted` it lacks, with the client's `read` and
    `write` of topic settings; returns what was set. Where the cluster refuses (no permission to
    describe or alter the topic's configuration), the worker goes on and the warning says the
    command that sets them."""
    lacking: dict[str, str] = {}
    try:
        lacking = missing(topic, wanted, read(topic, list(wanted)))
        if lacking:
            write(topic, lacking)
            log.warning("topic %s lacked settings aewatch needs; set %s", topic, _pairs(lacking))
        return lacking
    except Exception as exc:  # a refusal of any kind: the topic works as before, and we say so
        log.warning(
            "cannot check or set the settings of topic %s (%s: %s); set them with: "
            "kafka-configs.sh --bootstrap-server <broker> --alter --entity-type topics "
            "--entity-name %s --add-config %s",
            topic,
            type(exc).__name__,
            exc,
            topic,
            _pairs(lacking or wanted),
        )
        return {}


def settle_existing(
    topics: Mapping[str, TopicSpec],
    existing: set[str],
    read: Callable[[str, Iterable[str]], Current],
    write: Callable[[str, Mapping[str, str]], None],
) -> None:
    """`settle` each of `topics` that existed already and asks for settings."""
    for name, spec in topics.items():
        wanted = configs(spec)
        if name in existing and wanted:
            settle(name, wanted, read, write)


def _pairs(settings: Mapping[str, str]) -> str:
    return ",".join(f"{name}={value}" for name, value in settings.items())


def settled(
    stable_ends: Callable[[], Mapping[object, int]], high: Mapping[object, int], topic: str
) -> Mapping[object, int]:
    """A topic's end offsets for read_committed (`stable_ends`, asked again and again) once they
    reach the high watermarks `high` taken before: the transactions open then are over. A
    partition `stable_ends` leaves out ends at 0. Gives up after `SETTLE_S`, with a warning."""
    deadline = time.monotonic() + SETTLE_S
    end = stable_ends()
    while any(end.get(p, 0) < h for p, h in high.items()):
        if time.monotonic() > deadline:
            log.warning(
                "%s: a transaction still open after %.0f s hides what was committed after it; "
                "reading what is visible",
                topic,
                SETTLE_S,
            )
            break
        time.sleep(SETTLE_POLL_S)
        end = stable_ends()
    return end
