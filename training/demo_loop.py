"""The demo's last step, the operations loop: verdicts on its alarms, live precision, and a
threshold recalibrated from the verdicts.

Every alarm episode the demo raised is judged as an operator would: true_positive if it overlaps
an injected anomaly, false_positive otherwise. The verdicts go to a feedback topic; the join of
`aewatch quality` (in-process here) reads them with the alarm topic and gives the live precision
of the serving version, which is also appended to that version's MLflow run; then
`aewatch recalibrate --feedback` moves the threshold with the verdicts and the demo shows which
of the judged alarms the new threshold would still raise.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from pathlib import Path

__all__ = ["feedback_loop"]


def _say(text: str = "") -> None:
    print(text, flush=True)


def _verdicts(verdicts: dict[str, str]) -> list:
    from pipeline.quality.feedback import Feedback

    now = int(time.time() * 1000)
    return [
        Feedback(verdict, "demo-operator", now, episode_id=episode)
        for episode, verdict in sorted(verdicts.items())
    ]


def _live_precision(bootstrap: str, topics: dict, model: str, version: str, tracking_uri: str):
    """Run the join until it has read both topics; the serving version's figures."""
    from pipeline.kafka_io import open_client
    from pipeline.kafka_io.settings import KafkaConnection
    from pipeline.quality.service import QualityService, QualitySettings
    from pipeline.registry.client import log_run_metrics, version_run_id

    kafka = open_client(KafkaConnection(bootstrap))
    settings = QualitySettings(
        alarm_topic=(topics["output"],),
        feedback_topic=topics["feedback"],
        dlq_topic=topics["dlq"],
        log_interval_s=3600.0,  # logged once, when it stops
        http_port=-1,
    )
    service = QualityService(
        settings,
        kafka.tail([topics["output"], topics["feedback"]], from_beginning=True),
        kafka.sink(),
        run_of=lambda name, v: version_run_id(name, v, tracking_uri=tracking_uri),
        log_metrics=lambda run, figures, step, ms: log_run_metrics(
            run, figures, step=step, timestamp_ms=ms, tracking_uri=tracking_uri
        ),
    )
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not service.caught_up and time.monotonic() < deadline:
        time.sleep(0.1)
    service.stop()
    thread.join(30)
    service.tail.close()
    service.sink.close()
    return service.tracker.by_version(int(time.time() * 1000)).get((model, version))


def feedback_loop(
    root: Path,
    bootstrap: str,
    tracking_uri: str,
    live: dict,
    verdicts: dict[str, str],
    model: str,
    data_flags: list[str],
) -> dict:
    """Step 6 of the demo (see the module notes); returns what it found for the summary."""
    from pipeline.cli import main as cli
    from pipeline.kafka_io import open_client
    from pipeline.kafka_io.settings import KafkaConnection
    from pipeline.quality.cli import send_feedback

    started = time.monotonic()
    topics = {**live["topics"], "feedback": f"{live['topics']['output']}.feedback"}
    topics["dlq"] = f"{live['topics']['output']}.dlq"
    version = live["model_version"]
    confirmed = sum(v == "true_positive" for v in verdicts.values())
    _say(
        f"\n6. operator feedback: {len(verdicts)} alarm episodes judged ({confirmed} on injected "
        f"anomalies as true, {len(verdicts) - confirmed} others as false) -> {topics['feedback']}"
    )
    if not verdicts:
        _say("   no alarm to judge")
        return {"judged": 0}
    send_feedback(open_client(KafkaConnection(bootstrap)), topics["feedback"], _verdicts(verdicts))
    quality = _live_precision(bootstrap, topics, model, version, tracking_uri)
    precision = None if quality is None else quality.precision
    if precision is not None:
        _say(
            f"   live precision of {model} v{version}: {precision:.1%} ({quality.confirmed} "
            f"confirmed, {quality.refuted} refuted; also in the version's MLflow run as "
            "live_precision)"
        )
    out = io.StringIO()
    argv = ["recalibrate", "--model", f"models:/{model}@champion", *data_flags]
    argv += ["--tracking-uri", tracking_uri, "--experiment", "aewatch-demo", "--json"]
    argv += ["--feedback", topics["feedback"], "--alarm-topic", topics["output"]]
    argv += ["--bootstrap-servers", bootstrap]
    with contextlib.redirect_stdout(out):
        code = cli(argv)
    if code != 0:
        raise RuntimeError("recalibrating from the feedback failed")
    recalibrated = json.loads(out.getvalue().strip().splitlines()[-1])
    feedback = recalibrated["feedback"]
    threshold, before = recalibrated["threshold"], live["threshold"]
    kept = _kept(live["collected"].alarms, verdicts, threshold)
    _say(
        f"   recalibrated from the verdicts: threshold {before:.4g} -> {threshold:.4g} "
        f"(v{recalibrated['version']}, @challenger); {feedback['note']}"
    )
    _say(
        f"   at the new threshold: {kept['true_positive']}/{confirmed} confirmed alarms still "
        f"raised, {kept['false_positive']}/{len(verdicts) - confirmed} false ones; held-out "
        f"FPR {recalibrated['fpr_estimate']['rate']:.4f}"
    )
    return {
        "judged": len(verdicts),
        "live_precision": precision,
        "threshold_before": before,
        "threshold_after": threshold,
        "still_raised": kept,
        "recalibrated_version": recalibrated["version"],
        "seconds": round(time.monotonic() - started, 1),
    }


def _kept(alarms: list[dict], verdicts: dict[str, str], threshold: float) -> dict[str, int]:
    """Judged episodes whose peak score is above `threshold` (raised at it, to a first
    approximation: an episode also needs k of n windows above it)."""
    peaks: dict[str, float] = {}
    for event in alarms:
        data = event["data"]
        peaks[data["episode_id"]] = max(peaks.get(data["episode_id"], 0.0), data["peak_score"])
    kept = {"true_positive": 0, "false_positive": 0}
    for episode, verdict in verdicts.items():
        if verdict in kept and peaks.get(episode, 0.0) > threshold:
            kept[verdict] += 1
    return kept
