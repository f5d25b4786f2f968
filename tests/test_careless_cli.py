"""The command line as a careless user meets it: inputs are never overwritten, a finished
detector folder is replaced only with --overwrite, outputs appear whole or not at all, bad flags
and unwritable destinations fail before any data is read or any MLflow run is opened, and every
such failure is one line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.errors import ConfigError
from tests.helpers import labelled_series_csv, train_series_detector
from training.outputs import write_table

SERIES = ["--time-col", "ts", "--key-col", "machine", "--label-col", "label"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("careless")
    data = labelled_series_csv(root / "series.csv")
    return train_series_detector(data, root / "det"), data


def _one_line_error(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert lines and all(w in lines[-1] for w in words), lines[-3:]
    return lines[-1]


@pytest.mark.parametrize("command", ["score", "reconstruct", "encode"])
def test_an_output_that_is_the_input_is_refused(trained, tmp_path, capsys, command):
    result, data = trained
    copy = tmp_path / "series.csv"
    copy.write_bytes(Path(data).read_bytes())
    before = copy.read_bytes()
    code = main(
        [command, "--model", str(result.artifact_dir), "--data", str(copy), *SERIES[:4]]
        + ["--out", str(tmp_path / "." / "series.csv")]
    )
    _one_line_error(capsys, code, "out", "input")
    assert copy.read_bytes() == before


@pytest.mark.parametrize("command", ["score", "reconstruct", "encode"])
def test_an_output_inside_an_input_or_detector_folder_or_that_is_a_folder_is_refused(
    trained, tmp_path, capsys, command
):
    """An output in a Parquet folder that is the input was read as input by the next command
    (reconstructed rows taking the place of the real ones); one in the detector's folder was
    written among its files; a folder named `x.csv` was found only once the work was done, with
    a traceback."""
    result, data = trained
    folder = tmp_path / "readings"
    folder.mkdir()
    pd.read_csv(data).to_parquet(folder / "part-0.parquet")
    (tmp_path / "taken.csv").mkdir()
    common = [command, "--model", str(result.artifact_dir), "--data", str(folder), *SERIES[:4]]
    detector_files = sorted(p.name for p in Path(result.artifact_dir).iterdir())
    for out, says in [
        (folder / "out.parquet", "inside the input"),
        (tmp_path / "taken.csv", "folder"),
        (Path(result.artifact_dir) / "out.csv", "detector's folder"),
    ]:
        code = main([*common, "--out", str(out)])
        _one_line_error(capsys, code, "out", says)
    assert sorted(p.name for p in folder.iterdir()) == ["part-0.parquet"]
    assert sorted(p.name for p in Path(result.artifact_dir).iterdir()) == detector_files
    assert list((tmp_path / "taken.csv").iterdir()) == []


def test_a_negative_top_k_is_refused_as_the_flag_is_read(tmp_path, capsys):
    """`--top-k -1` named all features but one."""
    out = tmp_path / "scores.csv"
    argv = ["score", "--model", str(tmp_path), "--data", str(tmp_path / "x.csv")]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--out", str(out), "--top-k", "-1"])
    _one_line_error(capsys, exited.value.code, "--top-k")
    assert not out.exists()


def test_simulate_refuses_a_truth_file_that_is_its_csv_or_a_folder(tmp_path, capsys):
    readings = tmp_path / "fleet.csv"
    for argv, named in [
        (["--csv", str(readings), "--truth", str(tmp_path / "." / "fleet.csv")], "truth"),
        (["--csv", str(tmp_path), "--truth", str(tmp_path / "truth.csv")], "csv"),
    ]:
        code = main(["simulate", "--keys", "1", "--readings", "300", *argv])
        _one_line_error(capsys, code, named)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_simulate_makes_the_truth_files_folder_and_an_unwritable_one_is_one_line(tmp_path, capsys):
    """`--truth` in a folder not made yet raised FileNotFoundError (`--csv` made its folder)."""
    truth, readings = tmp_path / "runs" / "today" / "truth.csv", tmp_path / "fleet.csv"
    argv = ["simulate", "--keys", "1", "--readings", "300"]
    assert main([*argv, "--csv", str(readings), "--truth", str(truth)]) == 0
    assert len(pd.read_csv(truth)) == 6  # one row per injected anomaly, of each kind
    capsys.readouterr()
    (tmp_path / "a-file").write_text("")
    unwritable = str(tmp_path / "a-file" / "x.csv")
    for flags, named in (
        (["--csv", str(readings), "--truth", unwritable], "truth"),
        (["--csv", unwritable], "csv"),
    ):
        _one_line_error(capsys, main([*argv, *flags]), named, "cannot write")


@pytest.mark.parametrize(
    ("flags", "first", "last"),
    [  # seconds from now of the first and the last reading of each key
        (["--rate", "2"], 0, 99),  # one reading of each key a second, from now on
        (["--rate", "2", "--skip", "100000"], 0, 99),  # (was 27.8 h ahead, refused)
        ([], -99, 0),  # as fast as possible: the series ends now (it ran 99 s ahead)
        (["--skip", "50"], -99, 0),
    ],
)
def test_simulate_live_stamps_readings_with_the_current_time(tmp_path, capsys, flags, first, last):
    readings = tmp_path / "fleet.csv"
    argv = ["simulate", "--keys", "2", "--readings", "100", "--anomalies", "", "--live"]
    now = time.time()
    assert main([*argv, *flags, "--csv", str(readings)]) == 0
    ts = pd.to_datetime(pd.read_csv(readings)["ts"], utc=True, format="ISO8601")
    seconds = ts.map(pd.Timestamp.timestamp).to_numpy() - now
    assert abs(seconds.min() - first) < 5 and abs(seconds.max() - last) < 5, (
        seconds.min(),
        seconds.max(),
    )


def test_simulate_refuses_a_batch_too_large_for_one_record_before_connecting(capsys):
    """20,000 readings in one record (about 3 MB) raised MessageSizeTooLargeError, a traceback."""
    argv = ["simulate", "--bootstrap-servers", "127.0.0.1:1", "--topic", "readings"]
    code = main([*argv, "--keys", "1", "--readings", "20000", "--batch", "20000"])
    _one_line_error(capsys, code, "--batch", "bytes")


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "train",
            "--data",
            str(data),
            *SERIES,
            "--window",
            "8",
            "--epochs",
            "1",
            "--min-steps",
            "0",
        ]
        + ["--out", str(out), "--no-progress", "--tracking-uri", f"sqlite:///{out.parent}/m.db"]
        + list(extra)
    )


def test_train_into_an_existing_detector_needs_overwrite(trained, tmp_path, capsys):
    result, data = trained
    out = tmp_path / "det"
    out.mkdir()
    manifest = (Path(result.artifact_dir) / "manifest.json").read_bytes()
    (out / "manifest.json").write_bytes(manifest)
    _one_line_error(capsys, _train(Path(data), out), "out", "--overwrite")
    assert (out / "manifest.json").read_bytes() == manifest
    assert not (tmp_path / "m.db").exists(), "refused before any MLflow run was opened"


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_or_empty_data_fails_before_an_mlflow_run_is_opened(tmp_path, capsys, case):
    """The store was made and a failed run left in it, with 3 lines of MLflow's logs."""
    data = tmp_path / "series.csv"
    if case == "empty":
        data.write_bytes(b"")
    code = _train(data, tmp_path / "det")
    _one_line_error(capsys, code, str(data), "no such file" if case == "missing" else "empty")
    assert not (tmp_path / "m.db").exists()


def test_windows_of_one_reading_train_with_the_raw_score(trained, tmp_path, capsys):
    """The default score (terms, statistics over a window's readings) had NaN statistics at
    `--window 1` and failed after the training; a single reading is scored by its raw error."""
    from pipeline.detector import load_detector

    _, data = trained
    out = tmp_path / "det"
    assert _train(Path(data), out, "--window", "1") == 0, capsys.readouterr().err
    detector = load_detector(out)
    assert detector.input.window.length == 1 and detector.score_mode == "raw"


def test_a_fit_that_diverges_is_one_line_naming_the_learning_rate(trained, tmp_path, capsys):
    """`--lr 1e3` for 1e-3: a 27-line FloatingPointError traceback before."""
    _, data = trained
    out = tmp_path / "det"
    _one_line_error(capsys, _train(Path(data), out, "--lr", "1e3"), "diverged", "--lr")
    assert not out.exists()


@pytest.mark.parametrize("case", ["file", "unwritable"])
def test_an_unusable_out_fails_before_training(trained, tmp_path, capsys, case):
    _, data = trained
    if case == "file":
        out = tmp_path / "a-file"
        out.write_text("x")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "det"
        if os.access(locked, os.W_OK):  # root writes anywhere: use a path under a file
            (tmp_path / "plain").write_text("x")
            out = tmp_path / "plain" / "det"
    _one_line_error(capsys, _train(Path(data), out), "out")
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        (["--window", "0"], "window"),
        (["--stride", "0"], "stride"),
        (["--target-fpr", "1.5"], "target_fpr"),
        (["--target-fpr", "0"], "target_fpr"),
        (["--fractions", "0.5,0.5,0.5,0.1"], "fractions"),
        (["--register", "a/b@c"], "register"),  # MLflow refused it after the training
        (["--register", " "], "register"),
        # found only after the training (calibration), or after MLflow's store was opened
        (["--threshold-margin", "0"], "threshold_margin"),
        (["--calibration", "mad", "--mad-k", "-1"], "mad_k"),
        (["--calibration", "pot", "--pot-initial-quantile", "1.5"], "pot_initial_quantile"),
        (["--device", "foo"], "device"),
        (["--train-until", "notadate"], "train_until"),
        (["--weight-decay", "-1"], "weight_decay"),  # was named "patience"
        (["--window", "1", "--score", "terms"], "score"),  # failed after the training
        (["--fractions", "0.6,0.4,0,0"], "fractions"),  # so did an empty calibration part
    ],
)
def test_bad_flags_fail_before_any_io(tmp_path, capsys, flags, setting):
    missing = tmp_path / "does-not-exist.csv"  # never read: the flags fail first
    code = main(
        ["train", "--data", str(missing), *SERIES, "--epochs", "1", "--min-steps", "0", *flags]
        + ["--out", str(tmp_path / "det"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    )
    _one_line_error(capsys, code, setting)
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        (["--holdout", "0"], "holdout"),
        (["--holdout", "1.5"], "holdout"),
        (["--target-fpr", "2"], "target_fpr"),
        (["--method", "mad", "--mad-k", "-1"], "mad_k"),
        (["--method", "pot", "--pot-initial-quantile", "1.5"], "pot_initial_quantile"),
    ],
)
def test_bad_recalibrate_flags_fail_before_the_model_or_data_is_read(
    tmp_path, capsys, flags, setting
):
    missing = tmp_path / "does-not-exist.csv"  # the flags were checked only after reading it
    code = main(
        ["recalibrate", "--model", "models:/m@champion", "--data", str(missing), *flags]
        + ["--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    )
    _one_line_error(capsys, code, setting)
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        ("train", "--lr", "nan"),  # NaN passes every bound: refused as the flag is read
        ("train", "--threshold-margin", "inf"),
        ("train", "--weight-decay", "NaN"),
        ("recalibrate", "--mad-k", "nan"),
        ("simulate", "--rate", "inf"),
    ],
)
def test_a_number_flag_of_nan_or_infinity_fails_as_it_is_read(
    tmp_path, capsys, command, flag, value
):
    missing = tmp_path / "does-not-exist.csv"
    with pytest.raises(SystemExit) as exited:
        main([command, "--data", str(missing), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1, err  # (the usage block came first)
    assert flag in err[0] and "finite number" in err[0] and "--help" in err[0], err


@pytest.mark.parametrize(
    ("argv", "named"),
    [  # each was a traceback, or accepted: a negative rate ran as fast as it could
        (["simulate", "--keys", "0"], "--keys"),
        (["simulate", "--readings", "-5"], "--readings"),
        (["simulate", "--seed", "-1"], "--seed"),
        (["simulate", "--anomalous-keys", "-1"], "--anomalous-keys"),
        (["simulate", "--skip", "-10"], "--skip"),
        (["simulate", "--warmup", "-100"], "--warmup"),
        (["simulate", "--rate", "-5"], "--rate"),
        (["simulate", "--rate", "1e-300"], "rate"),
        (["simulate", "--features", "0"], "features"),
        (["simulate", "--features", "a,,b"], "features"),
        (["simulate", "--features", "ts,key"], "features"),  # a traceback from pandas
        (["simulate", "--features", "label,x"], "features"),  # the labels overwrote a sensor
        (["simulate", "--features", "a,a"], "features"),  # a CSV that train refuses
        (["simulate", "--topic", "bad topic"], "--topic"),
        (["alerts", "--topic", "^aewatch.*"], "--topic"),
        (["alerts", "--feedback-topic", "a/b"], "--feedback-topic"),
        (["alerts", "--timeout", "-1"], "--timeout"),
    ],
)
def test_a_tools_careless_value_is_one_line_before_any_io(tmp_path, capsys, argv, named):
    """Nothing is written and no broker is asked (nothing listens at 127.0.0.1:1)."""
    out = tmp_path / "fleet.csv"
    where = ["--bootstrap-servers", "127.0.0.1:1"]
    where += ["--csv", str(out)] if argv[0] == "simulate" else []
    try:
        code = main([*argv, *where])
    except SystemExit as exited:  # argparse's own refusal
        code = exited.code
    _one_line_error(capsys, code, named)
    assert not out.exists()


@pytest.mark.parametrize("uri", ["foo://bar", "FOLDER", "file://FOLDER"])
@pytest.mark.parametrize("command", ["train", "promote", "recalibrate"])
def test_a_tracking_uri_mlflow_cannot_open_is_one_line_before_any_io(
    tmp_path, capsys, command, uri
):
    uri = uri.replace("FOLDER", str(tmp_path / "store"))
    missing = str(tmp_path / "does-not-exist.csv")
    args = {
        "train": ["--data", missing, *SERIES, "--out", str(tmp_path / "det"), "--register", "m"],
        "promote": ["m"],
        "recalibrate": ["--model", "models:/m@champion", "--data", missing],
    }[command]
    code = main([command, *args, "--tracking-uri", uri])
    _one_line_error(capsys, code, "tracking URI")  # (was a traceback from MLflow)
    assert not list(tmp_path.iterdir())  # no store, run or folder made


@pytest.mark.parametrize("command", ["promote", "recalibrate", "score"])
def test_a_sqlite_store_that_does_not_exist_is_named_not_made(tmp_path, capsys, command):
    uri = f"sqlite:///{tmp_path}/no/such/mlflow.db"
    data, out = str(tmp_path / "data.csv"), str(tmp_path / "scores.csv")
    args = {
        "promote": ["m"],  # (was "m has no @challenger version", from a store made empty)
        "recalibrate": ["--model", "models:/m@champion", "--data", data],
        "score": ["--model", "models:/m@champion", "--data", data, "--out", out],
    }[command]
    code = main([command, *args, "--tracking-uri", uri])
    _one_line_error(capsys, code, "no MLflow store")
    assert not (tmp_path / "no").exists()


def test_rollback_of_an_unknown_model_is_one_line(tmp_path, capsys):
    from training.tracking import local_store

    uri = local_store(tmp_path, "tests")  # a store without the model
    code = main(["promote", "no-such-model", "--rollback", "--tracking-uri", uri])
    _one_line_error(capsys, code, "no-such-model")


def test_tables_are_written_atomically(tmp_path, monkeypatch):
    out = tmp_path / "scores.csv"
    out.write_text("old,complete\n1,2\n")

    def broken(self, path, *args, **kwargs):
        Path(path).write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError):
        write_table(pd.DataFrame({"a": [1]}), out)
    assert out.read_text() == "old,complete\n1,2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"], "no temporary left behind"


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        (["--tolerance", "-1"], "tolerance"),  # (each was promoted)
        (["--max-fpr", "0"], "max_fpr"),
        (["--max-fpr", "2"], "max_fpr"),
        (["--feedback", "verdicts.jsonl"], "data"),  # (each was left unused, exit 0)
        (["--label-col", "label"], "data"),
    ],
)
def test_promote_gates_that_cannot_hold_fail_before_the_registry(tmp_path, capsys, flags, setting):
    code = main(["promote", "m", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *flags])
    _one_line_error(capsys, code, setting)
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["feedback", "--file", "MISSING"], ("file", "No such file")),  # (was a traceback)
        (["feedback", "--file", "EMPTY"], ("file", "no feedback records")),
        (["quality", "--alarm-topic", "a", "--http-port", "70000"], ("http_port",)),
        # (it ran, and exited 0, with its MLflow history nowhere)
        (["quality", "--alarm-topic", "a", "--tracking-uri", "nostore://x"], ("'nostore'",)),
        (
            ["quality", "--alarm-topic", "a", "--tracking-uri", "sqlite:///NONE"],
            ("no MLflow store",),
        ),
        # (a traceback from the client, after quality had made its other topics)
        (["quality", "--alarm-topic", "bad topic"], ("alarm_topic", "'bad topic'")),
        (["quality", "--alarm-topic", "a", "--dlq-topic", "a/b"], ("dlq_topic", "'a/b'")),
        (["quality", "--alarm-topic", "a", "--feedback-topic", "x" * 250], ("feedback_topic",)),
        (
            ["feedback", "--topic", "bad topic", "--episode-id", "e", "--verdict", "unsure"],
            ("--topic", "'bad topic'"),
        ),
    ],
)
def test_ops_commands_refuse_bad_input_before_connecting(tmp_path, capsys, argv, words):
    (tmp_path / "empty.jsonl").write_text("\n")
    argv = [a.replace("MISSING", str(tmp_path / "no.jsonl")) for a in argv]
    argv = [a.replace("EMPTY", str(tmp_path / "empty.jsonl")) for a in argv]
    argv = [a.replace("NONE", str(tmp_path / "none.db")) for a in argv]
    try:
        code = main([*argv, "--bootstrap-servers", "127.0.0.1:1"])  # nothing listens there
    except SystemExit as exited:  # argparse's own refusal
        code = exited.code
    _one_line_error(capsys, code, *words)


def test_quality_names_a_port_in_use_before_making_its_topics(tmp_path, monkeypatch, capsys):
    """It was told only once the topics were made, when the server started."""
    import socket

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    (tmp_path / "m.db").touch()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        argv = ["quality", "--alarm-topic", "a", "--http-host", "127.0.0.1", "--http-port", port]
        code = main([*argv, "--bootstrap-servers", "127.0.0.1:1"])  # nothing listens there
    _one_line_error(capsys, code, "http_port")


@pytest.mark.parametrize("variable", [None, "nostore://x"])
def test_quality_without_a_tracking_uri_checks_where_every_command_looks(
    tmp_path, monkeypatch, capsys, variable
):
    """No `--tracking-uri`: MLFLOW_TRACKING_URI, else the working directory's mlflow.db, as for
    the worker (unchecked, a missing store or a bad URI showed only as a warning each time it
    logged figures)."""
    monkeypatch.chdir(tmp_path)
    if variable is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", variable)
    code = main(["quality", "--alarm-topic", "a", "--bootstrap-servers", "127.0.0.1:1"])
    words = ("no MLflow store", "mlflow.db") if variable is None else ("'nostore'",)
    _one_line_error(capsys, code, *words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_evaluate_refuses_a_feedback_file_without_records(trained, tmp_path, capsys, content):
    result, data = trained
    (tmp_path / "verdicts.jsonl").write_text(content)
    argv = ["evaluate", "--model", str(result.artifact_dir), "--data", str(data), *SERIES[:4]]
    code = main([*argv, "--feedback", str(tmp_path / "verdicts.jsonl")])
    # (it ran as if no alarm had been confirmed: every reading normal)
    _one_line_error(capsys, code, "feedback", "verdicts.jsonl holds no records")


def test_evaluate_refuses_feedback_that_judges_no_alarm(trained, tmp_path, capsys):
    """Verdicts without the alarm events they judge (the alarm topic's export forgotten): it
    ran as if no alarm had been confirmed, every reading normal, and printed the metrics."""
    result, data = trained
    verdict = {
        "schema": "aewatch.feedback.v1",
        "episode_id": "0123456789abcdef",
        "verdict": "true_positive",
        "who": "ops",
        "time": "2026-01-01T00:00:00Z",
    }
    (tmp_path / "verdicts.jsonl").write_text(json.dumps(verdict) + "\n[1, 2]\n")
    argv = ["evaluate", "--model", str(result.artifact_dir), "--data", str(data), *SERIES[:4]]
    code = main([*argv, "--feedback", str(tmp_path / "verdicts.jsonl")])
    _one_line_error(capsys, code, "feedback", "judges an alarm event")


def test_alerts_max_must_count_events(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["alerts", "--bootstrap-servers", "127.0.0.1:1", "--max", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and "--max" in err[0], err
    assert "at least 1" in err[0], err


def test_sample_refuses_an_output_that_is_its_input(tmp_path):
    from training.data.for_detector import DataSource
    from training.sources import ModelSource
    from training.uses import SampleSettings

    data = tmp_path / "in.csv"
    data.write_text("ts,key,a\n")
    with pytest.raises(ConfigError, match="is the input"):  # (was overwritten)
        SampleSettings(ModelSource("unused"), str(data), interpolate=(0, 1), data=DataSource(data))


@pytest.mark.parametrize("place", ["the data's folder", "a folder above it"])
def test_train_refuses_an_out_that_holds_its_data(trained, tmp_path, capsys, place):
    _, data = trained
    inside = tmp_path / "in" / "series"
    inside.mkdir(parents=True)
    copy = inside / "series.csv"
    copy.write_bytes(Path(data).read_bytes())
    out = inside if place == "the data's folder" else tmp_path / "in"
    _one_line_error(capsys, _train(copy, out, "--overwrite"), "out", "holds the input")
    assert sorted(p.name for p in inside.iterdir()) == ["series.csv"]  # no artifact beside it


@pytest.mark.parametrize("command", ["score", "train"])
def test_an_out_that_cannot_be_created_is_one_line_before_any_work(
    trained, tmp_path, capsys, command
):
    result, data = trained
    out = "/proc/aewatch-out.csv" if command == "score" else "/proc/aewatch-det"
    if command == "score":  # (was a traceback after scoring)
        argv = ["score", "--model", str(result.artifact_dir), "--data", str(data), *SERIES[:4]]
        code = main([*argv, "--out", out])
    else:
        code = _train(Path(data), Path(out))
    _one_line_error(capsys, code, "out", "cannot write")


@pytest.mark.parametrize(
    ("argv", "named"),
    [  # torch refused the seed, MLflow the name, each with a traceback after the data was read
        (["train", "--seed", "99999999999999999999"], "--seed"),
        (["train", "--seed", "-1"], "--seed"),
        (["sample", "--model", "m", "--seed", str(2**64)], "--seed"),
        (["simulate", "--csv", "x.csv", "--seed", str(2**63)], "--seed"),
        (["train", "--experiment", ""], "--experiment"),
        (["recalibrate", "--model", "models:/m@champion", "--experiment", " "], "--experiment"),
    ],
)
def test_a_seed_or_experiment_name_the_libraries_refuse_fails_as_it_is_read(
    tmp_path, capsys, argv, named
):
    argv = [arg.replace("x.csv", str(tmp_path / "x.csv")) for arg in argv]
    if argv[0] in ("train", "recalibrate"):
        argv += ["--data", str(tmp_path / "does-not-exist.csv")]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    _one_line_error(capsys, exited.value.code, named)
    assert not list(tmp_path.iterdir())


def test_f1_calibration_without_labels_fails_before_any_io(tmp_path, capsys):
    """It trained, then found no labelled anomaly to calibrate on."""
    missing = tmp_path / "does-not-exist.csv"
    code = main(
        ["train", "--data", str(missing), "--time-col", "ts", "--calibration", "f1"]
        + ["--out", str(tmp_path / "det"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    )
    _one_line_error(capsys, code, "calibration", "--label-col")
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("command", ["score", "encode"])
def test_a_device_there_is_not_is_refused_before_the_registry_is_asked(tmp_path, capsys, command):
    """`--device gpu7` with the registry unreachable: named after the registry's 15 s budget,
    as an unreachable registry, never as the device."""
    data = tmp_path / "in.csv"
    data.write_text("ts,a\n2026-01-01T00:00:00Z,1.0\n")
    argv = [command, "--model", "models:/fleet@champion", "--data", str(data)]
    argv += ["--out", str(tmp_path / "out.parquet"), "--device", "gpu7"]
    code = main([*argv, "--tracking-uri", "http://127.0.0.1:1"])
    _one_line_error(capsys, code, "device", "gpu7")
