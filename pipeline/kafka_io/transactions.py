"""The transactional half of a sink, the same for both Kafka clients.

Everything sent between two checkpoints, and the offsets that checkpoint commits, form one Kafka
transaction. The transactional id must be stable per worker: after a crash, the restarted
worker's `init_transactions` aborts what its predecessor left open, and the consumer group
metadata sent with the offsets fences a member that lost its partitions (KIP-447).

A client's sink mixes `Transactions` in before its plain sink and gives the four client calls:
`_begin_transaction`, `_send_offsets`, `_commit_transaction` and `_abort_transaction`.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.kafka_io.protocols import Partition

__all__ = ["Transactions"]


class Transactions:
    transactional = True
    _open = False  # a transaction has begun and is neither committed nor aborted

    def _begin_transaction(self) -> None:
        raise NotImplementedError

    def _send_offsets(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        raise NotImplementedError

    def _commit_transaction(self) -> None:
        raise NotImplementedError

    def _abort_transaction(self) -> None:
        """Abort the open transaction, errors suppressed."""
        raise NotImplementedError

    def _begin(self) -> None:
        if not self._open:
            self._begin_transaction()
            self._open = True

    def send(self, topic, key, value, headers=None, partition=None) -> None:
        self._begin()
        super().send(topic, key, value, headers, partition)

    def commit(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        """Commit what was sent and `offsets` (next offset to read) atomically."""
        if not self._open and not offsets:
            return
        self._begin()
        if offsets:
            self._send_offsets(offsets, group_metadata)
        self._commit_transaction()
        self._open = False
        self._raise_undelivered()

    def abort(self) -> None:
        """What was sent since the last commit is never seen by a read_committed consumer."""
        if self._open:
            self._abort_transaction()
            self._open = False

    def close(self) -> None:
        if self._open:
            self._abort_transaction()
        super().close()
