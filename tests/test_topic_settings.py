"""Topic specs and settling an existing topic's settings, without a broker: what a spec asks of
the cluster, which settings are given and which kept, and a refusal that leaves the worker going
with the command that would mend the topic. The same against the real broker, on both clients,
is in `test_kafka_contract`."""

from __future__ import annotations

import logging

import pytest

from pipeline.kafka_io import topics
from pipeline.worker.state import STATE_TOPIC


def test_a_spec_without_counts_leaves_them_to_the_broker():
    assert (topics.partitions({}), topics.replication({})) == (-1, -1)
    spec = {"num_partitions": 8, "replication_factor": 3, "topic_configs": {"segment.bytes": 1}}
    assert (topics.partitions(spec), topics.replication(spec)) == (8, 3)
    assert topics.configs(spec) == {"segment.bytes": "1"}


def test_the_state_topic_asks_for_compaction_and_records_over_a_megabyte():
    wanted = topics.configs(STATE_TOPIC)
    assert wanted["cleanup.policy"] == "compact"
    assert int(wanted["max.message.bytes"]) > 16 << 20


def _written(calls):
    return lambda topic, settings: calls.append((topic, dict(settings)))


def test_settings_inherited_from_the_broker_are_set_and_the_topics_own_are_kept(caplog):
    current = {
        "cleanup.policy": ("delete", False),  # the broker's default: set
        "segment.bytes": ("1048576", True),  # the operator's: kept
        "max.message.bytes": ("2000000", False),
    }
    calls: list = []
    wanted = {
        "cleanup.policy": "compact",
        "segment.bytes": "67108864",
        "max.message.bytes": "2000000",
    }
    with caplog.at_level(logging.WARNING, logger="pipeline.kafka_io.topics"):
        done = topics.settle("t", wanted, lambda topic, names: current, _written(calls))
    assert done == {"cleanup.policy": "compact"}
    assert calls == [("t", {"cleanup.policy": "compact"})]
    assert [r.getMessage() for r in caplog.records] == [
        "topic t keeps its own segment.bytes=1048576 (aewatch creates it with 67108864)",
        "topic t lacked settings aewatch needs; set cleanup.policy=compact",
    ]


@pytest.mark.parametrize("refused", ["read", "write"])
def test_a_refusal_is_one_warning_with_the_command_and_the_worker_goes_on(caplog, refused):
    def refuse(*args):
        raise PermissionError("TOPIC_AUTHORIZATION_FAILED")

    read = refuse if refused == "read" else (lambda topic, names: {})
    write = refuse if refused == "write" else _written([])
    wanted = {"cleanup.policy": "compact", "max.message.bytes": "17825792"}
    with caplog.at_level(logging.WARNING, logger="pipeline.kafka_io.topics"):
        assert topics.settle("aewatch-state", wanted, read, write) == {}
    (said,) = [r.getMessage() for r in caplog.records]
    assert said == (
        "cannot check or set the settings of topic aewatch-state (PermissionError: "
        "TOPIC_AUTHORIZATION_FAILED); set them with: kafka-configs.sh --bootstrap-server "
        "<broker> --alter --entity-type topics --entity-name aewatch-state --add-config "
        "cleanup.policy=compact,max.message.bytes=17825792"
    )
