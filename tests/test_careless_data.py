"""Data a careless export produces: every case is a clear error or a logged decision, never a
silently different series."""

from __future__ import annotations

import logging

import numpy as np
import orjson
import pandas as pd
import pytest

from pipeline.detector.windows import WindowSpec, cut_windows
from pipeline.errors import DataError
from training.data.series import load_series, series_groups


def _frame(rows: int = 40, keys=("a", "b")) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    parts = []
    for key in keys:
        parts.append(
            pd.DataFrame(
                {
                    "ts": pd.date_range("2026-01-01", periods=rows, freq="s").astype(str),
                    "machine": key,
                    "s0": rng.normal(size=rows),
                    "s1": rng.normal(size=rows),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _load(frame: pd.DataFrame, tmp_path, **kwargs):
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    return load_series(path, time_col="ts", key_col="machine", **kwargs)


def test_a_numeric_column_with_a_text_cell_is_an_error_not_a_dropped_sensor(tmp_path):
    frame = _frame()
    frame["s1"] = frame["s1"].astype(object)
    frame.loc[17, "s1"] = "n/a "
    with pytest.raises(DataError, match=r"column 's1' holds numbers, but data row 18 holds"):
        _load(frame, tmp_path)


@pytest.mark.parametrize("sep", [",", ";"])
def test_a_column_named_twice_in_the_header_is_an_error_not_a_made_up_sensor(tmp_path, sep):
    """pandas renamed the second `s0` to `s0.1`, a feature no reading would ever carry."""
    path = tmp_path / "data.csv"
    frame = _frame()
    frame.to_csv(path, index=False, sep=sep, header=["ts", "machine", "s0", "s0"])
    with pytest.raises(DataError, match=r"the header names column 's0' more than once"):
        load_series(path, time_col="ts", key_col="machine")


def test_text_and_label_like_columns_are_left_out_with_a_warning(tmp_path, caplog):
    frame = _frame()
    frame["status"] = "running"
    frame["label"] = 0
    with caplog.at_level(logging.WARNING, logger="training.data.columns"):
        table = _load(frame, tmp_path)
    assert table.features == ("s0", "s1")
    assert "'label' look like labels" in caplog.text
    assert "not numeric and are not features: 'status'" in caplog.text
    named = _load(frame, tmp_path, label_col="label")
    assert named.features == ("s0", "s1") and named.label_col == "label"


def test_epoch_seconds_are_refused_not_read_as_1970(tmp_path):
    frame = _frame()
    seconds = (pd.to_datetime(frame["ts"]) - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
    frame["ts"] = seconds.astype(np.int64)
    with pytest.raises(DataError, match=r"epoch seconds\? multiply them by 1000"):
        _load(frame, tmp_path)
    frame["ts"] = frame["ts"] * 1000  # epoch milliseconds, as the worker reads `ts`
    assert str(_load(frame, tmp_path).frame["ts"].iloc[0]).startswith("2026-01-01")


def test_the_worker_refuses_epoch_seconds_as_training_does():
    """A reading whose `ts` is epoch seconds is dead-lettered with the reason, not windowed as
    a 1970 reading; a batched record holding such times is refused once."""
    from pipeline.detector import InputSpec, WindowSpec
    from pipeline.modalities.series import SeriesIntake
    from pipeline.modalities.windowing import ReadyWindows
    from tests.worker_support import Record

    spec = InputSpec("series", ("s0", "s1"), WindowSpec(4, 1))
    intake = SeriesIntake(spec, 1 << 20)
    start_s = 1_767_225_600  # 2026-01-01 in seconds
    records = []
    for i in range(12):
        ts = (start_s + i) * (1000 if i % 3 else 1)  # every third reading in seconds
        value = orjson.dumps({"key": "a", "ts": ts, "values": {"s0": 1.0, "s1": 2.0}})
        records.append(Record("in", 0, i, b"a", value))
    batch = {"key": "a", "ts": [start_s + 20, start_s + 21], "values": {"s0": [1, 2], "s1": [3, 4]}}
    records.append(Record("in", 0, 12, b"a", orjson.dumps(batch)))
    refused = []
    pending = ReadyWindows()
    intake.take(("in", 0), records, pending, lambda record, why: refused.append((record, why)))
    assert [r.offset for r, _ in refused] == [0, 3, 6, 9, 12]
    assert {why.reason for _, why in refused} == {"bad_timestamp"}
    assert "epoch seconds" in refused[0][1].detail
    assert len(pending) == 8 - 3  # the 8 readings in milliseconds make 5 windows of 4


def _records_of_1971(form: str, as_text: bool) -> list:
    """Six readings of key "a" from 1971-06-01, a second apart, in one of the record forms,
    their times as text (an Arrow timestamp) or as epoch-ms numbers."""
    import pyarrow as pa

    from tests.worker_support import Record

    ms = 44_582_400_000 + np.arange(6, dtype=np.int64) * 1000  # 1971-06-01T00:00:00Z on
    text = [pd.Timestamp(t, unit="ms").isoformat() + "Z" for t in ms.tolist()]
    times = text if as_text else ms.tolist()
    if form == "single":
        values = [
            {"key": "a", "ts": t, "values": {"s0": float(i), "s1": 1.0}}
            for i, t in enumerate(times)
        ]
    elif form == "columnar":
        values = [
            {"key": "a", "ts": times[i : i + 3], "values": {"s0": [1.0] * 3, "s1": [2.0] * 3}}
            for i in (0, 3)
        ]
    else:
        stamps = pa.array(ms, pa.timestamp("ms") if as_text else pa.int64())
        values = []
        for i in (0, 3):
            batch = pa.RecordBatch.from_pydict(
                {"ts": stamps[i : i + 3], "s0": [1.0] * 3, "s1": [2.0] * 3}
            )
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, batch.schema) as writer:
                writer.write_batch(batch)
            values.append(sink.getvalue().to_pybytes())
    return [
        Record("in", 0, i, b"a", v if isinstance(v, bytes) else orjson.dumps(v))
        for i, v in enumerate(values)
    ]


@pytest.mark.parametrize("form", ["single", "columnar", "arrow"])
def test_times_of_1971_given_as_text_are_taken_numbers_are_read_as_epoch_seconds(form):
    """The epoch-seconds rule is for numbers: an ISO-8601 time (or an Arrow timestamp) of
    1970-01-02 to 1973 says what it is and is windowed, as training reads such a column."""
    from pipeline.detector import InputSpec, WindowSpec
    from pipeline.modalities.series import SeriesIntake
    from pipeline.modalities.windowing import ReadyWindows

    spec = InputSpec("series", ("s0", "s1"), WindowSpec(4, 1))
    for as_text in (True, False):
        intake = SeriesIntake(spec, 1 << 20)
        refused, pending = [], ReadyWindows()
        records = _records_of_1971(form, as_text)
        intake.take(("in", 0), records, pending, lambda r, why, out=refused: out.append(why))
        if as_text:
            assert refused == [] and len(pending) == 6 - 3
        else:
            assert len(refused) == len(records) and len(pending) == 0
            assert all("epoch seconds" in why.detail for why in refused)
        for record in records:  # and one record a poll
            intake = SeriesIntake(spec, 1 << 20)
            alone = []
            intake.take(
                ("in", 0), [record], ReadyWindows(), lambda r, why, out=alone: out.append(why)
            )
            assert len(alone) == (0 if as_text else 1)


def test_repeated_timestamps_are_dropped_as_the_worker_drops_them(tmp_path, caplog):
    frame = _frame()
    repeats = frame.iloc[[5, 6, 50]].copy()
    repeats[["s0", "s1"]] = 99.0  # a later reading of the same timestamp: the worker refuses it
    doubled = pd.concat([frame, repeats], ignore_index=True)
    with caplog.at_level(logging.WARNING, logger="training.data.series"):
        table = _load(doubled, tmp_path)
    assert "3 row(s) repeat their key's timestamp" in caplog.text
    clean = _load(frame, tmp_path)
    assert table.frame.equals(clean.frame)
    spec = WindowSpec(8, 2)
    assert np.array_equal(
        cut_windows(series_groups(table), spec).windows,
        cut_windows(series_groups(clean), spec).windows,
    )


def test_a_key_shorter_than_a_window_is_named_in_a_warning(tmp_path, caplog):
    frame = pd.concat([_frame(keys=("a", "b")), _frame(rows=5, keys=("tiny",))], ignore_index=True)
    table = _load(frame, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.detector.windows"):
        windows = cut_windows(series_groups(table), WindowSpec(8, 2))
    assert set(windows.keys) == {"a", "b"}
    assert "1 key(s) have fewer readings than one window of 8" in caplog.text
    assert "'tiny' (5)" in caplog.text


def test_the_out_of_core_reader_drops_repeated_timestamps_as_the_in_memory_one(tmp_path, caplog):
    from training.data.streamed import SeriesStream

    frame = _frame()
    repeats = frame.iloc[[5, 50]].copy()
    repeats[["s0", "s1"]] = 99.0
    doubled = pd.concat([frame, repeats], ignore_index=True).sort_values(["machine", "ts"])
    doubled["ts"] = pd.to_datetime(doubled["ts"])
    doubled.to_parquet(tmp_path / "doubled.parquet", index=False)
    stream = SeriesStream(
        tmp_path / "doubled.parquet", time_col="ts", key_col="machine", batch_rows=7
    )
    with caplog.at_level(logging.WARNING):
        chunks = [chunk for batch in stream.chunks() for chunk in batch]
        list(stream.chunks())  # a second pass says nothing new
    rows = sum(len(c.times) for c in chunks)
    assert rows == len(frame)
    assert not any((c.values == 99.0).any() for c in chunks)
    assert caplog.text.count("2 row(s) repeat their key's timestamp") == 1


def _hive(root, frame: pd.DataFrame):
    """A hive-partitioned Parquet folder, one file per key, and a README beside them."""
    for key, part in frame.groupby("machine"):
        folder = root / f"machine={key}"
        folder.mkdir(parents=True)
        part.drop(columns="machine").to_parquet(folder / "part-0.parquet", index=False)
    (root / "README.txt").write_text("exported by hand\n")  # not Parquet: passed over
    return root


@pytest.mark.parametrize("reader", ["in memory", "out of core"])
def test_a_damaged_parquet_file_of_a_folder_is_named_not_left_out(tmp_path, reader):
    from training.data.streamed import SeriesStream

    frame = _frame()
    frame["ts"] = pd.to_datetime(frame["ts"])
    root = _hive(tmp_path / "data", frame)

    def read() -> set:
        """The keys read."""
        if reader == "in memory":
            return set(load_series(root, time_col="ts", key_col="machine").frame["machine"])
        stream = SeriesStream(root, time_col="ts", key_col="machine", batch_rows=7)
        return {chunk.key for batch in stream.chunks() for chunk in batch}

    assert read() == {"a", "b"}
    damaged = root / "machine=b" / "part-0.parquet"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(DataError, match=r"machine=b/part-0.parquet cannot be read as Parquet"):
        read()  # (was read without key b, silently)


def test_training_on_a_flat_lined_recording_is_refused_in_one_line(tmp_path, capsys):
    """Every calibration window scored alike; the refusal names that, not window flags that
    would not help."""
    from pipeline.cli import main

    frame = _frame(rows=600)
    frame["s0"], frame["s1"] = 1.5, -2.0
    frame.to_csv(tmp_path / "flat.csv", index=False)
    code = main(
        [
            "train",
            "--data",
            str(tmp_path / "flat.csv"),
            "--time-col",
            "ts",
            "--key-col",
            "machine",
            "--out",
            str(tmp_path / "det"),
            "--epochs",
            "1",
            "--min-steps",
            "0",
            "--no-progress",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not (tmp_path / "det").exists()
    assert "score the same" in err[-1] and "would work" not in err[-1], err[-1]


def test_a_gap_row_does_not_hide_a_later_reading_of_its_time_when_gaps_are_dropped(tmp_path):
    """The worker refuses a reading with a missing value and takes the next of its time; with
    `--fill drop` both readers of files do the same, rather than keep the gap row as the time's
    first reading and then drop it, which lost the time."""
    from training.data.streamed import SeriesStream

    frame = _frame()
    gap = frame.iloc[[7]].copy()
    frame.loc[7, "s0"] = np.nan  # the first reading of its time has a gap, a later one has not
    frame = pd.concat([frame, gap], ignore_index=True).sort_values(["machine", "ts"], kind="stable")
    table = _load(frame, tmp_path, fill="drop")
    part = table.frame[table.frame["machine"] == "a"]
    assert len(part) == 40
    assert part["s0"].tolist()[7] == gap["s0"].item()

    frame["ts"] = pd.to_datetime(frame["ts"])
    frame.to_parquet(tmp_path / "gap.parquet", index=False)
    stream = SeriesStream(
        tmp_path / "gap.parquet", time_col="ts", key_col="machine", fill="drop", batch_rows=5
    )
    chunks = [c for batch in stream.chunks() for c in batch if c.key == "a"]
    streamed = np.concatenate([c.values for c in chunks])
    assert np.array_equal(streamed, part[["s0", "s1"]].to_numpy(np.float32))


def test_a_time_in_epoch_seconds_among_milliseconds_is_refused_as_the_worker_refuses_it(tmp_path):
    """The worker refuses each reading whose `ts` reads as 1970-1973; a file of epoch ms with
    one such row is refused naming it, not read with that row as a 1970 reading."""
    frame = _frame()
    ms = (pd.to_datetime(frame["ts"]) - pd.Timestamp(0)) // pd.Timedelta(milliseconds=1)
    frame["ts"] = ms.astype(np.int64)
    frame.loc[12, "ts"] = frame.loc[12, "ts"] // 1000
    with pytest.raises(DataError, match=r"data row 13: 1767225612 .* epoch seconds\?"):
        _load(frame, tmp_path)


def test_a_time_text_is_read_alike_by_tables_the_pyfunc_and_the_worker_or_refused_by_all():
    """Every combination of ISO-8601's date, time, fraction and offset forms (and some that are
    not ISO-8601 as pandas reads it: week dates, comma fractions, offsets with seconds, a year
    or a month alone) gives one millisecond, cut toward zero, or a refusal, whoever reads it."""
    import itertools

    from pipeline.batch import _times
    from pipeline.modalities.readings import parse_timestamp_ms
    from training.data.columns import parse_times

    dates = ["2026-03-04", "20260304", "2026-03", "202603", "2026", "2026-W10-3", "1969-12-31"]
    times = ["", "T05", "T05:06", "T0506", " 05:06:07", "T050607", "T05:06:07.1"]
    times += ["T23:59:59.9996", "T05:06:07.123456", "T05:06:07,5", "T05:06:07.1234567"]
    offsets = ["", "Z", "+01", "+01:00", "-0530", "+01:00:30", "+000000"]
    cases = [d + t + o for d, t, o in itertools.product(dates, times, offsets) if t or not o]

    def read(reader, text):
        try:
            return reader(text)
        except (ValueError, DataError):
            return "refused"

    def table(text):
        return int(parse_times(pd.Series([text], dtype=object), "f", "ts").view(np.int64)[0])

    def pyfunc(text):
        return int(
            _times(pd.Series([text], dtype=object)).to_numpy("datetime64[ns]").view(np.int64)[0]
        )

    differ = []
    for text in cases:
        worker = read(parse_timestamp_ms, text)
        ns = {read(table, text), read(pyfunc, text)}
        if ns != ({worker * 1_000_000} if worker != "refused" else {"refused"}):
            differ.append((text, worker, ns))
    assert differ == [], f"{len(differ)} of {len(cases)} differ, e.g. {differ[:3]}"
    assert sum(read(parse_timestamp_ms, text) != "refused" for text in cases) > 100
