"""Operator feedback: the schema, the join to emitted alarms on the real broker, exact live
figures, dead letters, and the join rebuilt after the worker and the join restart, with the
figures in the serving version's MLflow run (real MLflow server)."""

from __future__ import annotations

import threading
import uuid

import jsonschema
import orjson
import pytest

from pipeline.events import ModelIdentity, event_schema
from pipeline.kafka_io import open_client
from pipeline.kafka_io.settings import KafkaConnection
from pipeline.quality.cli import send_feedback
from pipeline.quality.feedback import (
    FEEDBACK_SCHEMA,
    RFC3339,
    Feedback,
    FeedbackError,
    feedback_record,
    parse_feedback,
)
from pipeline.quality.service import QualityService, QualitySettings
from pipeline.worker.alarms import AlarmTransition
from pipeline.worker.writer import alarm_event
from tests.helpers import metric_values, wait_until
from tests.kafka_support import consume, ensure_topics, produce
from tests.worker_support import Record

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000
GOOD = {
    "schema": "aewatch.feedback.v1",
    "episode_id": "ep-1",
    "verdict": "true_positive",
    "who": "alice",
    "time": "2026-01-01T01:00:00Z",
}
BAD = [
    ("malformed_json", b"{not json"),
    ("malformed_json", b"[1, 2]"),
    ("invalid_feedback", {**GOOD, "verdict": "maybe"}),
    ("invalid_feedback", {k: v for k, v in GOOD.items() if k != "episode_id"}),
    ("invalid_feedback", {**GOOD, "who": ""}),
    ("invalid_feedback", {**GOOD, "time": "yesterday"}),
    ("invalid_feedback", {**GOOD, "time": "2026-01-01T01:00:00"}),  # no zone
    # taken by datetime.fromisoformat, refused by the schema's pattern (they were accepted)
    *(
        ("invalid_feedback", {**GOOD, "time": text})
        for text in (
            "2026-01-05T10:00Z",
            "2026-01-05T10Z",
            "20260105T100000Z",
            "2026-01-05T10:00:00+0100",
            "2026-W02-1T10:00:00Z",
            "2026-01-05T10:00:00,5Z",
        )
    ),
    ("invalid_feedback", {**GOOD, "schema": "aewatch.feedback.v2"}),
    ("invalid_feedback", {**GOOD, "colour": "red"}),
    ("invalid_feedback", {**GOOD, "span": {"start": "2026-01-01T01:00:00Z"}}),
]


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else orjson.dumps(value)


def test_alarm_events_whose_fields_have_other_types_are_passed_over():
    from pipeline.quality.tracker import QualityTracker

    opened = {
        "id": "ev-1",
        "type": "aewatch.alarm.opened",
        "subject": "pump-1",
        "data": {"episode_id": "ep-1", "start": "2026-01-01T00:00:00Z", "peak_score": 2.0},
    }
    resolved = {**opened, "id": "ev-2", "type": "aewatch.alarm.resolved"}
    tracker = QualityTracker(HOUR)
    for event in (
        {**opened, "data": {**opened["data"], "peak_score": "high"}},
        {**opened, "data": {**opened["data"], "threshold": [1]}},
        {**opened, "data": {**opened["data"], "model": "pumps"}},
        {**opened, "type": "aewatch.anomaly.v1", "data": {"is_anomaly": True, "score": None}},
    ):
        assert tracker.event(event, T0) is False
    assert tracker.alarms == {} and tracker.targets == {}
    assert tracker.event(opened, T0) is True
    assert tracker.event({**resolved, "data": {**resolved["data"], "peak_score": {}}}, T0) is False
    assert tracker.alarms["ep-1"].peak_score == 2.0 and set(tracker.targets) == {"ev-1"}


def test_the_parser_and_the_json_schema_agree():
    schema = event_schema(FEEDBACK_SCHEMA)
    assert f"^{RFC3339.pattern}$" == schema["$defs"]["time"]["pattern"]
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    full = {**GOOD, "event_id": "e", "key": "pump-1", "note": "seal leak"}
    full["span"] = {"start": "2026-01-01T00:10:00Z", "end": "2026-01-01T00:40:00+00:00"}
    for good in (GOOD, full):
        validator.validate(good)
        parsed = parse_feedback(_bytes(good))
        assert parse_feedback(orjson.dumps(parsed.to_json())) == parsed
    for reason, bad in BAD:
        with pytest.raises(FeedbackError) as caught:
            parse_feedback(_bytes(bad))
        assert caught.value.reason == reason
        if not isinstance(bad, bytes):
            assert not validator.is_valid(bad), bad


def _opened(model: ModelIdentity, key: str, start_ms: int) -> tuple[dict, str]:
    episode = f"{key}-{start_ms}"
    transition = AlarmTransition(
        kind="opened",
        key=key,
        partition=("in", 0),
        episode_id=episode,
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, episode)),
        time_ms=start_ms + 1000,
        start_ms=start_ms,
        end_ms=None,
        peak_score=2.0,
        peak_ms=start_ms + 1000,
        windows=3,
        anomalous_windows=3,
        top_features=[("x", 1.0)],
    )
    return alarm_event(model, transition, 1.0), episode


def _verdict(target: str, verdict: str, at_ms: int, *, by_event: bool = False) -> Feedback:
    kind = "event_id" if by_event else "episode_id"
    return Feedback(verdict=verdict, who="op", time_ms=at_ms, **{kind: target})


@pytest.mark.parametrize("alarm_first", [True, False])
def test_time_to_acknowledge_is_the_first_verdicts_whatever_is_read_first(alarm_first):
    """A restart reads both topics again in no fixed order across them: verdicts that waited
    for their alarm kept only the latest, so the figure was the latest verdict's (3,600 s)."""
    from pipeline.quality.tracker import QualityTracker

    model = ModelIdentity("m", "1")
    event, episode = _opened(model, "pump-1", T0)
    emitted = T0 + 2000
    verdicts = [
        _verdict(episode, "unsure", emitted + 60_000),
        _verdict(episode, "true_positive", emitted + 3_600_000),
    ]
    tracker = QualityTracker(HOUR * 24)
    if alarm_first:
        tracker.event(event, emitted)
    for verdict in verdicts:
        tracker.feedback(verdict)
    if not alarm_first:
        tracker.event(event, emitted)
    quality = tracker.by_version(emitted)[("m", "1")]
    assert quality.ack_seconds == [60.0]
    assert quality.confirmed == 1, "the latest verdict judges the alarm"


class _SlowTail:
    """A tail whose first polls come back empty before its first fetch, as a real one's can."""

    def __init__(self, polls: list) -> None:
        self.polls, self.unread = polls, sum(1 for p in polls if p)

    def poll(self, timeout_ms: int) -> dict:
        polled = self.polls.pop(0) if self.polls else {}
        self.unread -= bool(polled)
        return polled

    def reached_end(self) -> bool:
        return self.unread == 0

    def close(self) -> None:
        pass


class _NoSink:
    def send(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass


def _readiness_at_each_take(tail) -> tuple[QualityService, list[bool]]:
    """A service run over `tail` until idle, and whether it was ready as each poll was taken."""
    settings = QualitySettings(
        alarm_topic=("alarms",),
        feedback_topic="fb",
        dlq_topic="dlq",
        log_interval_s=0,
        http_port=-1,
        stop_after_idle_s=3,
    )
    service = QualityService(settings, tail, _NoSink(), clock=iter(range(10**6)).__next__)
    ready: list[bool] = []
    taken = service.take
    service.take = lambda polled: (ready.append(service.caught_up), taken(polled))
    service.run()
    return service, ready


def test_the_service_is_ready_only_once_it_has_read_what_was_there():
    key, value = feedback_record(_verdict("no-such-episode", "true_positive", T0))
    record = Record("fb", 0, 0, key, value)
    tail = _SlowTail([{}, {}, {("fb", 0): [record]}])
    service, ready = _readiness_at_each_take(tail)
    assert ready == [False], "not ready while records it has not read wait"
    assert service.caught_up


def test_the_service_becomes_ready_while_its_topics_stay_busy():
    """Alarms arriving faster than a poll's wait: no poll comes back empty, and it stayed
    unready for as long as they came."""
    records = [Record("alarms", 0, i, None, b"{}") for i in range(40)]
    tail = _SlowTail([{("alarms", 0): [r]} for r in records])
    tail.reached_end = lambda: len(tail.polls) < 30  # what was there at the start is read
    service, ready = _readiness_at_each_take(tail)
    assert len(ready) == 40 and ready[-1], "ready while polls still bring records"
    assert not ready[5], "not before what was there has been read"


class _Running:
    """A `QualityService` on the real broker, in a thread; `figures()` scrapes its metrics."""

    def __init__(self, bootstrap: str, topics: dict, now_ms: int, **hooks) -> None:
        settings = QualitySettings(
            alarm_topic=(topics["alarms"],),
            feedback_topic=topics["feedback"],
            dlq_topic=topics["dlq"],
            period_s=24 * 3600.0,
            log_interval_s=0.2 if hooks else 0.0,
            http_port=-1,
        )
        kafka = open_client(KafkaConnection(bootstrap))
        tail = kafka.tail([topics["alarms"], topics["feedback"]], from_beginning=True)
        self.service = QualityService(settings, tail, kafka.sink(), wall_ms=lambda: now_ms, **hooks)
        self.thread = threading.Thread(target=self.service.run, daemon=True)
        self.thread.start()

    def figures(self) -> dict:
        return metric_values(self.service.metrics.exposition().decode())

    def close(self) -> None:
        self.service.stop()
        self.thread.join(30)
        self.service.tail.close()
        self.service.sink.close()


def _topics(_create_topic, bootstrap: str) -> dict:
    tag = uuid.uuid4().hex[:8]
    topics = {"alarms": f"q-alarms-{tag}", "feedback": f"q-fb-{tag}", "dlq": f"q-dlq-{tag}"}
    ensure_topics(bootstrap, {topics["alarms"]: {}, topics["dlq"]: {}})
    ensure_topics(bootstrap, {topics["feedback"]: {"topic_configs": {"cleanup.policy": "compact"}}})
    return topics


@pytest.mark.kafka
def test_precision_and_counts_are_exact_on_a_scripted_sequence(kafka_bootstrap, create_topic):
    topics = _topics(create_topic, kafka_bootstrap)
    v1, v2 = ModelIdentity("pumps", "1", "champion"), ModelIdentity("pumps", "2", "champion")
    now = T0 + 30 * HOUR
    # v1: 4 alarms long ago (outside the 24 h period) and 3 recent; v2: 2 recent
    plan = [
        (v1, "a", T0, "true_positive"),
        (v1, "a", T0 + HOUR, "false_positive"),
        (v1, "b", T0 + 2 * HOUR, "false_positive"),
        (v1, "b", T0 + 3 * HOUR, "unsure"),
        (v1, "a", T0 + 10 * HOUR, "true_positive"),
        (v1, "b", T0 + 11 * HOUR, "true_positive"),
        (v1, "b", T0 + 12 * HOUR, "false_positive"),
        (v2, "a", T0 + 20 * HOUR, "true_positive"),
        (v2, "b", T0 + 21 * HOUR, None),  # not judged
    ]
    opened = [
        (model, key, start, verdict, *_opened(model, key, start))
        for model, key, start, verdict in plan
    ]
    kafka = open_client(KafkaConnection(kafka_bootstrap))
    # the alarm events carry their emission time as the Kafka timestamp
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for _, key, start, _, event, _ in opened:
        producer.send(
            topics["alarms"], key=key.encode(), value=orjson.dumps(event), timestamp_ms=start + 2000
        )
    producer.flush()
    producer.close()
    verdicts = [
        _verdict(
            ep if i % 2 else event["id"], verdict, start + 600_000 * (i + 1), by_event=not i % 2
        )
        for i, (_, _, start, verdict, event, ep) in enumerate(opened)
        if verdict
    ]
    # a changed mind: the first alarm is later refuted (the later verdict wins)
    verdicts.append(_verdict(opened[0][5], "false_positive", T0 + 29 * HOUR))
    # feedback on an alarm nobody emitted waits; bad records go to the DLQ
    verdicts.append(_verdict("no-such-episode", "true_positive", T0))
    send_feedback(kafka, topics["feedback"], verdicts)
    produce(
        kafka_bootstrap,
        topics["feedback"],
        [(b"x", b"{broken"), (b"y", orjson.dumps({**GOOD, "verdict": "maybe"}))],
    )
    running = _Running(kafka_bootstrap, topics, now)
    try:
        # caught up: everything on both topics read; and the two bad records, sent last,
        # dead-lettered
        def taken() -> bool:
            counted = running.figures().get(
                ("aewatch_feedback_records_total", (("outcome", "dead_letter"),))
            )
            return running.service.caught_up and (counted or 0) >= 2

        wait_until(taken, 60, "the join reading both topics")
        figures = running.figures()
    finally:
        running.close()

    def value(name, **labels):
        return figures.get((name, tuple(sorted(labels.items()))))

    one, two = {"model": "pumps", "version": "1"}, {"model": "pumps", "version": "2"}
    # v1 recent (emitted after now - 24 h = T0 + 6 h): 2 confirmed, 1 refuted
    assert value("aewatch_feedback_precision", **one) == pytest.approx(2 / 3)
    assert value("aewatch_feedback_precision", **two) == pytest.approx(1.0)
    assert value("aewatch_feedback_precision_judged", **one) == 3  # what the 2 / 3 stands on
    assert value("aewatch_feedback_alarms_confirmed", **one, key="a") == 1  # T0 was refuted later
    assert value("aewatch_feedback_alarms_refuted", **one, key="a") == 2
    assert value("aewatch_feedback_alarms_confirmed", **one, key="b") == 1
    assert value("aewatch_feedback_alarms_refuted", **one, key="b") == 2
    assert value("aewatch_feedback_alarms_unsure", **one, key="b") == 1
    assert value("aewatch_feedback_key_precision", **one, key="b") == pytest.approx(0.5)
    assert value("aewatch_feedback_alarms_confirmed", **two, key="b") is None  # none judged
    # time to acknowledge: the first verdict's time less the emission (start + 2 s)
    acks = [600 * (i + 1) - 2 for i in range(7)]
    assert value("aewatch_feedback_ack_seconds_count", **one) == 7
    assert value("aewatch_feedback_ack_seconds_sum", **one) == pytest.approx(sum(acks))
    assert value("aewatch_feedback_ack_seconds_bucket", **one, le="900.0") == 1
    assert value("aewatch_feedback_waiting") == 1
    assert value("aewatch_feedback_records_total", outcome="dead_letter") == 2
    dead = consume(kafka_bootstrap, topics["dlq"], idle_s=2.0)
    reasons = sorted(dict(r.headers)["aewatch.dlq.reason"].decode() for r in dead)
    assert reasons == ["invalid_feedback", "malformed_json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.worker_support import train_fleet_detector

    return train_fleet_detector(tmp_path_factory.mktemp("fleet"))


def _alarms(bootstrap: str, topic: str) -> list[dict]:
    events = [orjson.loads(r.value) for r in consume(bootstrap, topic, idle_s=2.0)]
    return [e for e in events if e["type"] == "aewatch.alarm.opened"]


@pytest.mark.kafka
@pytest.mark.mlflow_server
def test_feedback_joins_alarms_across_worker_and_join_restarts_and_reaches_mlflow(
    kafka_bootstrap, create_topic, mlflow_server, trained
):
    from mlflow import MlflowClient

    from pipeline.registry.client import log_run_metrics, version_run_id
    from tests.helpers import register_result
    from tests.kafka_support import names, run_worker, stream_items, worker_settings
    from tests.worker_support import fleet

    name = f"quality-{uuid.uuid4().hex[:6]}"
    version = register_result(mlflow_server, trained, name)
    topics = names("quality")
    topics.update(alarms=topics["output"], feedback=f"{topics['output']}-fb")
    create_topic(topics["input"], partitions=2)
    ensure_topics(kafka_bootstrap, {topics["feedback"]: {}, topics["alarms"]: {}})
    settings = worker_settings(
        kafka_bootstrap,
        topics,
        f"models:/{name}/{version}",
        events="alarms",
        tracking_uri=mlflow_server,
        reload_interval_s=0,
    )
    items = stream_items(fleet(seed=3, keys=4, readings_per_key=3000))
    half = len(items) // 2
    kafka = open_client(KafkaConnection(kafka_bootstrap))
    hooks = dict(
        run_of=lambda model, v: version_run_id(model, v, tracking_uri=mlflow_server),
        log_metrics=lambda run, figures, step, ms: log_run_metrics(
            run, figures, step=step, timestamp_ms=ms, tracking_uri=mlflow_server
        ),
    )
    import time

    # the first join runs while the worker's first life emits alarms and operators judge them
    first = _Running(kafka_bootstrap, topics, int(time.time() * 1000), **hooks)
    try:
        produce(kafka_bootstrap, topics["input"], items[:half])
        run_worker(settings)
        before = _alarms(kafka_bootstrap, topics["alarms"])
        assert before, "the first half of the stream raised no alarm"
        send_feedback(
            kafka,
            topics["feedback"],
            [_verdict(before[0]["data"]["episode_id"], "true_positive", int(time.time() * 1000))],
        )
        wait_until(
            lambda: first.figures().get(
                ("aewatch_feedback_records_total", (("outcome", "joined"),))
            ),
            30,
            "the first verdict joined",
        )
    finally:
        first.close()
    # the worker restarts (its alarm state comes back from the state topic) and goes on
    produce(kafka_bootstrap, topics["input"], items[half:])
    run_worker(settings)
    alarms = _alarms(kafka_bootstrap, topics["alarms"])
    assert len(alarms) > len(before), "the second half of the stream raised no alarm"
    # verdicts after both restarts, on alarms of both lives: every third confirmed, by event id
    now = int(time.time() * 1000)
    verdicts = [
        _verdict(e["id"], "true_positive" if i % 3 == 0 else "false_positive", now, by_event=True)
        for i, e in enumerate(alarms)
    ]
    send_feedback(kafka, topics["feedback"], verdicts)
    confirmed = sum(1 for i in range(len(alarms)) if i % 3 == 0)
    expected = confirmed / len(alarms)
    second = _Running(kafka_bootstrap, topics, now, **hooks)
    labels = (("model", name), ("version", version))
    try:
        wait_until(
            lambda: (
                second.figures().get(("aewatch_feedback_precision", labels))
                == pytest.approx(expected)
            ),
            60,
            "the join rebuilt after its restart",
        )
        figures = second.figures()
    finally:
        second.close()
    assert figures[("aewatch_feedback_ack_seconds_count", labels)] == len(alarms)
    assert figures.get(("aewatch_feedback_waiting", ())) == 0
    run_id = MlflowClient(mlflow_server).get_model_version(name, version).run_id
    history = MlflowClient(mlflow_server).get_metric_history(run_id, "live_precision")
    assert history[-1].value == pytest.approx(expected)
    assert history[-1].step == len(alarms)
    assert history[0].value == pytest.approx(1.0) and history[0].step == 1  # the first life's


@pytest.mark.kafka
def test_operators_answer_alarms_as_they_arrive_and_from_the_command_line(
    kafka_bootstrap, tmp_path
):
    import subprocess
    import sys

    topics = _topics(None, kafka_bootstrap)
    model = ModelIdentity("pumps", "1")
    first, first_episode = _opened(model, "a", T0)
    second, _ = _opened(model, "b", T0 + HOUR)
    produce(
        kafka_bootstrap,
        topics["alarms"],
        [(b"a", orjson.dumps(first)), (b"b", orjson.dumps(second))],
    )
    cli = [sys.executable, "-m", "pipeline.cli"]
    alerts = subprocess.run(
        [
            *cli,
            "alerts",
            "--bootstrap-servers",
            kafka_bootstrap,
            "--topic",
            topics["alarms"],
            "--from-beginning",
            "--max",
            "2",
            "--timeout",
            "20",
            "--interactive",
            "--feedback-topic",
            topics["feedback"],
            "--who",
            "carol",
        ],
        input="f  valve maintenance\n\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert alerts.returncode == 0, alerts.stderr
    assert alerts.stdout.count("OPENED") == 2
    written = subprocess.run(
        [
            *cli,
            "feedback",
            "--bootstrap-servers",
            kafka_bootstrap,
            "--topic",
            topics["feedback"],
            "--event-id",
            second["id"],
            "--verdict",
            "true_positive",
            "--who",
            "dan",
            "--time",
            "2026-01-01T02:00:00Z",
            "--span-start",
            "2026-01-01T01:00:00Z",
            "--span-end",
            "2026-01-01T01:30:00Z",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert written.returncode == 0, written.stderr
    refused = subprocess.run(
        [
            *cli,
            "feedback",
            "--bootstrap-servers",
            kafka_bootstrap,
            "--topic",
            topics["feedback"],
            "--episode-id",
            "x",
            "--verdict",
            "unsure",
            "--time",
            "tomorrow",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("aewatch feedback: error:")
    records = [parse_feedback(r.value) for r in consume(kafka_bootstrap, topics["feedback"])]
    assert [(r.verdict, r.who, r.episode_id, r.event_id, r.note) for r in records] == [
        ("false_positive", "carol", first_episode, None, "valve maintenance"),
        ("true_positive", "dan", None, second["id"], None),
    ]
    assert records[1].span == (T0 + HOUR, T0 + HOUR + 1_800_000)


def test_a_time_its_zone_puts_beyond_the_years_is_refused_not_raised():
    """`0001-01-01T00:00:00+01:00` is a valid RFC 3339 date-time before year 1 in UTC: the
    parser raised OverflowError (a traceback from `aewatch feedback`, and a crash of the quality
    service, which dead-letters only FeedbackError)."""
    early = {**GOOD, "time": "0001-01-01T00:00:00+01:00"}
    late = {**GOOD, "span": {"start": "2026-01-01T00:00:00Z", "end": "9999-12-31T23:59:59-01:00"}}
    for bad, field in ((early, "time"), (late, "span")):
        with pytest.raises(FeedbackError, match=f"{field}.*outside the years 1 to 9999"):
            parse_feedback(_bytes(bad))


def test_an_answer_on_the_terminal_sends_only_what_the_service_would_take(monkeypatch, capsys):
    """`aewatch alerts --interactive` sent its verdicts unchecked: a note over 4,000 characters
    or a `who` over 200, which the quality service then refuses, and an event with no id to
    judge raised AttributeError."""
    import io

    from pipeline.tools.alerts import _Asker

    sent = []

    class _Kafka:
        def ensure_topics(self, topics) -> None:
            pass

        def sink(self):
            class _Sink(_NoSink):
                def send(self, topic, key=None, value=None, **kwargs) -> None:
                    sent.append(value)

            return _Sink()

    opened = {"type": "aewatch.alarm.opened", "id": "ev1", "data": {"episode_id": "ep1"}}
    no_id = {"type": "aewatch.anomaly.v1", "data": {"is_anomaly": True}}
    for event, answer, who in (
        (opened, "f " + "n" * 5000, "alice"),
        (opened, "t", "w" * 300),
        (no_id, "t", "alice"),
        (opened, "t seal leak", "alice"),
    ):
        monkeypatch.setattr("sys.stdin", io.StringIO(answer + "\n"))
        _Asker(_Kafka(), "fb", who)(event)
    assert [parse_feedback(value).note for value in sent] == ["seal leak"]
    err = capsys.readouterr().err
    assert err.count("not sent") == 3 and "longer than 4000" in err and "no id" in err


def test_an_event_whose_data_is_not_an_object_is_not_asked_about():
    """`aewatch alerts --json --interactive` shows such a record as it is; asking for a verdict
    on it raised AttributeError out of the tail (`data` a list)."""
    from pipeline.tools.alerts import _judgeable, answer_feedback

    for data in (["not", "an", "object"], "text", 5):
        for kind in ("aewatch.alarm.opened", "aewatch.anomaly.v1"):
            event = {"type": kind, "id": "ev1", "data": data}
            assert not _judgeable(event)
            assert answer_feedback(event, "t", "alice", T0) is None
    opened = {"type": "aewatch.alarm.opened", "id": "ev1", "data": {"episode_id": "ep1"}}
    assert _judgeable(opened)
    assert answer_feedback(opened, "t", "alice", T0).episode_id == "ep1"


def test_an_answer_is_a_verdict_only_when_spelled_as_one():
    """Any word starting with t, f or u was a verdict: "tbd" sent true_positive, "fix later"
    false_positive."""
    from pipeline.tools.alerts import answer_feedback

    opened = {"type": "aewatch.alarm.opened", "id": "ev1", "data": {"episode_id": "ep1"}}
    for answer, verdict in [
        ("t", "true_positive"),
        ("True seal leak", "true_positive"),
        ("tp", "true_positive"),
        ("F", "false_positive"),
        ("false_positive valve", "false_positive"),
        ("u", "unsure"),
        ("unsure", "unsure"),
    ]:
        assert answer_feedback(opened, answer, "alice", T0).verdict == verdict, answer
    for answer in ("tbd", "fix later", "undecided", "tru", ""):
        assert answer_feedback(opened, answer, "alice", T0) is None, answer


def test_each_event_type_has_its_own_line_and_other_records_say_they_are_not_events():
    """`aewatch alerts` printed every JSON object as an ANOMALY line: the drift events the worker
    writes to the alarm topic, the normal windows of `--emit-all`, sensor readings, feedback
    records, `{}`."""
    from pipeline.events import DRIFT_SCHEMA
    from pipeline.tools.alerts import read_event

    model = ModelIdentity("pumps", "3")
    opened, _ = _opened(model, "pump-7", T0)
    drift = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": model.source,
        "type": "aewatch.drift.v1",
        "subject": "*",
        "time": "2026-01-01T00:00:00.000Z",
        "datacontenttype": "application/json",
        "data": {
            "key": "*",
            "scope": "overall",
            "statistic": "psi",
            "value": 0.41,
            "limit": 0.25,
            "windows": 500,
            "shares": [0.1] * 10,
            "expected_share": 0.1,
            "model": {"name": "pumps", "version": "3", "alias": None},
        },
    }
    jsonschema.validate(drift, event_schema(DRIFT_SCHEMA))
    window = {
        "type": "aewatch.anomaly.v1",
        "subject": "pump-7",
        "time": "2026-01-01T00:00:00.000Z",
        "data": {"score": 0.05, "is_anomaly": False, "model": {"name": "pumps", "version": "3"}},
    }
    anomalous = {**window, "data": {**window["data"], "score": 0.9, "is_anomaly": True}}

    def line(value) -> str:
        return read_event(orjson.dumps(value), 7)[1]

    assert line(opened).split()[1:3] == ["OPENED", "pump-7"]
    assert "DRIFT" in line(drift) and "*" in line(drift) and "ANOMALY" not in line(drift)
    assert "overall PSI 0.41 (limit 0.25) over 500 windows" in line(drift)
    assert line(window).split()[1:3] == ["normal", "pump-7"]
    assert line(anomalous).split()[1:3] == ["ANOMALY", "pump-7"]
    reading = {"key": "pump-7", "ts": T0, "values": {"s0": 1.0}}
    for other in (reading, GOOD, {}, {**window, "type": "aewatch.other.v1"}, 5):
        assert line(other) == "(not an aewatch event at offset 7)", other
