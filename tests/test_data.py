"""Loading, cleaning, fingerprinting and splitting of training data (`training.data`)."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.errors import DataError
from training.data.columns import FILL_POLICIES
from training.data.images import ImageSet, load_images, split_images
from training.data.series import SeriesTable, load_series, split_series

PARTS = ("train", "validation", "calibration", "test")


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def machines_frame(rows_per_key: int = 20, seed: int = 0) -> pd.DataFrame:
    """Two machines, shuffled rows, ISO times one second apart, a 0/1/2 label column."""
    rng = np.random.default_rng(seed)
    frames = []
    for key in ("m2", "m1"):
        times = pd.date_range("2024-01-01", periods=rows_per_key, freq="s")
        frames.append(
            pd.DataFrame(
                {
                    "datetime": times.strftime("%Y-%m-%d %H:%M:%S"),
                    "machine": key,
                    "a": rng.normal(size=rows_per_key).round(3),
                    "b": rng.normal(size=rows_per_key).round(3),
                    "anomaly": rng.integers(0, 3, size=rows_per_key),
                }
            )
        )
    frame = pd.concat(frames, ignore_index=True)
    return frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)


def load_machines(path: Path, **options: object) -> SeriesTable:
    return load_series(path, time_col="datetime", key_col="machine", label_col="anomaly", **options)


# -- series: reading -----------------------------------------------------------------------------
def test_csv_with_semicolons_and_keys_is_sorted_by_key_then_time(tmp_path: Path) -> None:
    raw = machines_frame()
    path = tmp_path / "skab.csv"
    raw.to_csv(path, sep=";", index=False)

    table = load_machines(path)

    assert len(table) == len(raw)
    assert table.keys() == ["m1", "m2"]
    assert table.features == ("a", "b")
    assert list(table.frame.columns) == ["datetime", "machine", "a", "b", "anomaly"]
    assert table.frame.index.equals(pd.RangeIndex(len(raw)))
    assert table.frame["datetime"].dtype == "datetime64[ns]"
    assert table.values().dtype == np.float32 and table.values().shape == (len(raw), 2)
    expected = raw.assign(datetime=pd.to_datetime(raw["datetime"]))
    expected = expected.sort_values(["machine", "datetime"]).reset_index(drop=True)
    assert table.frame["machine"].tolist() == expected["machine"].tolist()
    np.testing.assert_array_equal(table.frame["a"], expected["a"])
    np.testing.assert_array_equal(table.frame["anomaly"], (expected["anomaly"] != 0).astype(int))
    assert table.frame["anomaly"].dtype == np.int64
    for key, group in table.groups():
        assert set(group["machine"]) == {key}
        assert group["datetime"].is_monotonic_increasing
    assert table.time_range() == ("2024-01-01T00:00:00", "2024-01-01T00:00:19")
    assert table.source == str(path)


def test_separator_can_be_given_and_keys_stay_text(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "tabs.txt",
        "t\tid\tx\n2024-01-01T00:00:01Z\t007\t1.5\n2024-01-01T00:00:00Z\t007\t2.5\n",
    )
    table = load_series(path, time_col="t", key_col="id", sep="\t")
    assert table.keys() == ["007"]
    assert table.frame["x"].tolist() == [2.5, 1.5]


def test_gzipped_csv_with_epoch_milliseconds(tmp_path: Path) -> None:
    path = tmp_path / "series.csv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("ts,v\n1700000001000,2\n1700000000000,1\n")
    table = load_series(path, time_col="ts")
    assert table.frame["v"].tolist() == [1.0, 2.0]
    assert table.time_range() == ("2023-11-14T22:13:20", "2023-11-14T22:13:21")
    assert table.keys() == [""]
    assert [key for key, _ in table.groups()] == [""]


def test_parquet_file_and_directory(tmp_path: Path) -> None:
    raw = machines_frame()
    raw["datetime"] = pd.to_datetime(raw["datetime"])
    raw.to_parquet(tmp_path / "one.parquet", index=False)
    folder = tmp_path / "parts"
    folder.mkdir()
    raw.iloc[:15].to_parquet(folder / "a.parquet", index=False)
    raw.iloc[15:].to_parquet(folder / "b.pq", index=False)

    single = load_machines(tmp_path / "one.parquet")
    split_up = load_machines(folder)

    assert single.features == ("a", "b") and len(single) == len(raw)
    assert single.digest() == split_up.digest()
    pd.testing.assert_frame_equal(single.frame, split_up.frame)


def test_default_features_are_numeric_columns_other_than_time_key_label(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "mixed.csv",
        """
        ts,site,label,x,comment,y,flag
        2024-01-01,3,1,0.5,hello,1,1
        2024-01-02,4,0,0.25,world,2,0
        """.replace("        ", ""),
    )
    table = load_series(path, time_col="ts", key_col="site", label_col="label")
    assert table.features == ("x", "y", "flag")
    assert "label" not in table.features and "site" not in table.features


def test_label_is_never_a_feature(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "lab.csv", "ts,x,label\n2024-01-01,1,5\n2024-01-02,2,0\n")
    table = load_series(path, time_col="ts", label_col="label")
    assert table.features == ("x",)
    assert table.frame["label"].tolist() == [1, 0]
    with pytest.raises(DataError, match=r"lab\.csv.*'label'.*label column"):
        load_series(path, time_col="ts", label_col="label", features=["x", "label"])


# -- series: errors ------------------------------------------------------------------------------
@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    return write_csv(
        tmp_path / "small.csv",
        "ts,key,x,y,note,label\n"
        "2024-01-01,k,1,2,ok,0\n"
        "2024-01-02,k,2,3,ok,0\n"
        "2024-01-03,k,3,4,ok,1\n",
    )


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere\.csv: no such file"):
        load_series(tmp_path / "nowhere.csv", time_col="ts")


@pytest.mark.parametrize(
    ("options", "column"),
    [
        ({"time_col": "when"}, "when"),
        ({"time_col": "ts", "key_col": "machine"}, "machine"),
        ({"time_col": "ts", "label_col": "anomaly"}, "anomaly"),
        ({"time_col": "ts", "features": ["x", "z"]}, "z"),
    ],
)
def test_missing_columns_are_named_with_the_available_ones(
    small_csv: Path, options: dict, column: str
) -> None:
    with pytest.raises(DataError) as caught:
        load_series(small_csv, **options)
    message = str(caught.value)
    assert "small.csv" in message and repr(column) in message
    assert "'ts', 'key', 'x', 'y', 'note', 'label'" in message


def test_unparseable_time_names_the_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "times.csv", "ts,x\n2024-01-01,1\n2024-01-02,2\nsoon,3\n")
    with pytest.raises(DataError, match=r"times\.csv: column 'ts', data row 3: 'soon'"):
        load_series(path, time_col="ts")


def test_non_numeric_feature_names_column_row_and_value(small_csv: Path) -> None:
    with pytest.raises(
        DataError, match=r"small\.csv: column 'note' is not numeric: data row 1 holds 'ok'"
    ):
        load_series(small_csv, time_col="ts", features=["x", "note"])


def test_unknown_fill_policy_lists_the_allowed_ones(small_csv: Path) -> None:
    with pytest.raises(DataError, match=r"small\.csv: unknown fill policy 'mean'") as caught:
        load_series(small_csv, time_col="ts", fill="mean")
    assert all(policy in str(caught.value) for policy in FILL_POLICIES)


def test_empty_file_and_no_rows(tmp_path: Path) -> None:
    header_only = write_csv(tmp_path / "header.csv", "ts,x")
    with pytest.raises(DataError, match=r"header\.csv: the file has no data rows"):
        load_series(header_only, time_col="ts")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv"):
        load_series(empty, time_col="ts")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"data\.xlsx: unsupported file type"):
        load_series(path, time_col="ts")


# -- series: fill policies -----------------------------------------------------------------------
GAPS_CSV = """
t,k,x,y
2024-01-01T00:00:00,b,,1
2024-01-01T00:00:01,b,2,
2024-01-01T00:00:02,b,,
2024-01-01T00:00:03,b,6,4
2024-01-01T00:00:04,b,,5
2024-01-01T00:00:00,a,1,10
2024-01-01T00:00:01,a,inf,20
2024-01-01T00:00:02,a,3,30
"""


@pytest.fixture
def gaps_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "gaps.csv", GAPS_CSV)


@pytest.mark.parametrize(
    ("fill", "x", "y"),
    [
        (
            "ffill",
            [1, 1, 3, 2, 2, 2, 6, 6],
            [10, 20, 30, 1, 1, 1, 4, 5],
        ),
        (
            "interpolate",
            [1, 2, 3, 2, 2, 4, 6, 6],
            [10, 20, 30, 1, 2, 3, 4, 5],
        ),
    ],
)
def test_fill_within_each_key(gaps_csv: Path, fill: str, x: list, y: list) -> None:
    table = load_series(gaps_csv, time_col="t", key_col="k", fill=fill)
    assert table.frame["k"].tolist() == ["a"] * 3 + ["b"] * 5
    assert table.frame["x"].tolist() == x
    assert table.frame["y"].tolist() == y


def test_drop_removes_rows_with_any_gap(gaps_csv: Path) -> None:
    table = load_series(gaps_csv, time_col="t", key_col="k", fill="drop")
    assert table.frame["k"].tolist() == ["a", "a", "b"]
    assert table.frame["x"].tolist() == [1, 3, 6]
    assert table.frame["y"].tolist() == [10, 30, 4]
    assert table.frame.index.equals(pd.RangeIndex(3))


def test_error_policy_names_column_first_row_and_count(gaps_csv: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_series(gaps_csv, time_col="t", key_col="k")
    message = str(caught.value)
    assert "gaps.csv" in message and "'x'" in message
    assert "4 missing or non-finite" in message and "data row 1" in message


def test_all_missing_column_for_a_key_cannot_be_filled(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "hole.csv", "t,k,x\n2024-01-01,a,1\n2024-01-01,b,\n2024-01-02,b,\n")
    for fill in ("ffill", "interpolate"):
        with pytest.raises(
            DataError, match=r"hole\.csv: column 'x' has no finite value for key 'b'"
        ):
            load_series(path, time_col="t", key_col="k", fill=fill)
    assert load_series(path, time_col="t", key_col="k", fill="drop").keys() == ["a"]


def test_drop_everything_is_an_error(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "void.csv", "t,x,y\n2024-01-01,,1\n2024-01-02,1,\n")
    with pytest.raises(DataError, match=r"void\.csv: fill='drop' leaves no rows"):
        load_series(path, time_col="t", fill="drop")


# -- series: digest ------------------------------------------------------------------------------
def test_digest_is_stable_path_free_and_sensitive(tmp_path: Path) -> None:
    raw = machines_frame()
    first = tmp_path / "first.csv"
    raw.to_csv(first, index=False)
    copy = tmp_path / "elsewhere" / "copy.csv"
    copy.parent.mkdir()
    shutil.copy(first, copy)

    digest = load_machines(first).digest()
    assert len(digest) == 64
    assert load_machines(first).digest() == digest
    assert load_machines(copy).digest() == digest

    changed = raw.copy()
    changed.loc[5, "a"] += 0.001
    changed.to_csv(copy, index=False)
    assert load_machines(copy).digest() != digest
    renamed = raw.replace({"machine": {"m1": "m3"}})
    renamed.to_csv(copy, index=False)
    assert load_machines(copy).digest() != digest


# -- series: splits ------------------------------------------------------------------------------
def assert_time_contiguous(parts: dict[str, SeriesTable], whole: SeriesTable) -> None:
    """Each key's parts, in PARTS order, are consecutive runs of that key's rows, no overlap."""
    for key, rows in whole.groups():
        pieces = []
        for part in PARTS:
            table = parts[part]
            assert list(table.frame.columns) == list(whole.frame.columns)
            assert (table.features, table.key_col, table.label_col, table.source) == (
                whole.features,
                whole.key_col,
                whole.label_col,
                whole.source,
            )
            of_key = (
                table.frame[table.frame[whole.key_col] == key] if whole.key_col else table.frame
            )
            assert of_key["datetime"].is_monotonic_increasing
            pieces.append(of_key)
        joined = pd.concat(pieces, ignore_index=True)
        pd.testing.assert_frame_equal(joined, rows.reset_index(drop=True))


def test_split_by_fractions_per_key(tmp_path: Path) -> None:
    raw = machines_frame(rows_per_key=23)
    raw.to_csv(tmp_path / "m.csv", index=False)
    table = load_machines(tmp_path / "m.csv")

    parts = split_series(table, (0.6, 0.15, 0.15, 0.1))

    # floor(23 * f) per key for the last three, the remainder to train.
    for part, per_key in zip(PARTS, (15, 3, 3, 2), strict=True):
        counts = parts[part].frame["machine"].value_counts().to_dict()
        assert counts == {"m1": per_key, "m2": per_key}
    assert_time_contiguous(parts, table)


def test_split_with_train_until(tmp_path: Path) -> None:
    raw = machines_frame(rows_per_key=20)
    raw.to_csv(tmp_path / "m.csv", index=False)
    table = load_machines(tmp_path / "m.csv")

    parts = split_series(table, (0.5, 0.2, 0.2, 0.1), train_until="2024-01-01T00:00:09")

    assert parts["train"].frame["datetime"].max() == pd.Timestamp("2024-01-01T00:00:09")
    # 10 rows per key after the cut, shared 2:2:1 among validation, calibration and test.
    for part, per_key in zip(PARTS, (10, 4, 4, 2), strict=True):
        counts = parts[part].frame["machine"].value_counts().to_dict()
        assert counts == {"m1": per_key, "m2": per_key}
    assert_time_contiguous(parts, table)
    with pytest.raises(DataError, match=r"m\.csv: the train part would be empty"):
        split_series(table, train_until="2023-12-31")
    with pytest.raises(DataError, match=r"validation part would be empty: every row is at or"):
        split_series(table, train_until="2025-01-01")  # after the data: nothing is left
    with pytest.raises(DataError, match=r"the 2 rows after train_until=.* \(2 keys, each split"):
        split_series(table, train_until="2024-01-01T00:00:18")


def test_a_split_too_fine_for_short_keys_says_that_keys_are_split_on_their_own(tmp_path):
    """100 keys of 4 rows: 400 rows, but each key is split on its own, and 4 rows have no 10 %
    test part; the message says so, not that 400 rows are too few for 0.1."""
    from training.data.streamed import SeriesStream

    rows = [f"2024-01-01T00:00:0{i},k{k},{i}" for k in range(100) for i in range(4)]
    path = write_csv(tmp_path / "short.csv", "datetime,machine,x\n" + "\n".join(rows) + "\n")
    table = load_series(path, time_col="datetime", key_col="machine")
    why = r"the longest of the 100 keys has 4 rows, too few for fraction 0.15 \(each key's"
    with pytest.raises(DataError, match=why):
        split_series(table)
    frame = pd.read_csv(path, parse_dates=["datetime"])
    frame.to_parquet(tmp_path / "short.parquet", index=False)
    stream = SeriesStream(tmp_path / "short.parquet", time_col="datetime", key_col="machine")
    with pytest.raises(DataError, match=why):
        stream.plan((0.6, 0.15, 0.15, 0.1))


def test_zero_fraction_gives_an_empty_part_with_the_same_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "z.csv", "datetime,x\n2024-01-01,1\n2024-01-02,2\n2024-01-03,3\n")
    table = load_series(path, time_col="datetime")
    parts = split_series(table, (2 / 3, 1 / 3, 0, 0))
    assert [len(parts[p]) for p in PARTS] == [2, 1, 0, 0]
    assert list(parts["test"].frame.columns) == ["datetime", "x"]
    assert_time_contiguous(parts, table)
    with pytest.raises(DataError, match=r"z\.csv: the validation part would be empty: 3 rows"):
        split_series(table, (0.6, 0.15, 0.15, 0.1))


@pytest.mark.parametrize(
    "fractions", [(0.5, 0.5), (0.7, 0.2, 0.2, -0.1), (0.6, 0.2, 0.2, 0.1), (1, 0, 0, float("nan"))]
)
def test_bad_fractions(small_csv: Path, fractions: tuple) -> None:
    table = load_series(small_csv, time_col="ts")
    with pytest.raises(DataError, match=r"small\.csv: .*fractions"):
        split_series(table, fractions)
    images = ImageSet(np.zeros((4, 1, 2, 2), np.float32), None, "pixels.npy")
    with pytest.raises(DataError, match=r"pixels\.npy: .*fractions"):
        split_images(images, fractions)


# -- images --------------------------------------------------------------------------------------
def rng_pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.uint8)


def test_npy_grayscale_and_channels_last(tmp_path: Path) -> None:
    gray = rng_pixels((5, 6, 7))
    np.save(tmp_path / "gray.npy", gray)
    rgb = rng_pixels((5, 6, 7, 3), seed=1)
    np.save(tmp_path / "rgb.npy", rgb)
    first = rng_pixels((5, 3, 6, 7), seed=2)
    np.save(tmp_path / "first.npy", first)
    np.save(tmp_path / "labels.npy", np.array([0, 1, 0, 2, 1]))

    loaded = load_images(tmp_path / "gray.npy", labels_path=tmp_path / "labels.npy")
    assert loaded.images.dtype == np.float32 and loaded.images.shape == (5, 1, 6, 7)
    np.testing.assert_array_equal(loaded.images[:, 0], gray)
    assert loaded.labels.dtype == np.int64 and loaded.labels.tolist() == [0, 1, 0, 2, 1]

    colour = load_images(tmp_path / "rgb.npy")
    assert colour.images.shape == (5, 3, 6, 7) and colour.labels is None
    np.testing.assert_array_equal(colour.images, np.moveaxis(rgb, 3, 1))
    np.testing.assert_array_equal(load_images(tmp_path / "first.npy").images, first)

    only_ones = load_images(
        tmp_path / "gray.npy", labels_path=tmp_path / "labels.npy", normal_class=1
    )
    assert only_ones.labels.tolist() == [1, 1]
    np.testing.assert_array_equal(only_ones.images[:, 0], gray[[1, 4]])


def test_npz_with_images_and_labels(tmp_path: Path) -> None:
    pixels = rng_pixels((4, 5, 5))
    np.savez(tmp_path / "set.npz", x=pixels, y=np.array([3, 3, 7, 3]))
    images = load_images(tmp_path / "set.npz")
    assert images.images.shape == (4, 1, 5, 5)
    assert images.labels.tolist() == [3, 3, 7, 3]
    with pytest.raises(DataError, match=r"set\.npz: unknown class 5; the labels are 3, 7"):
        load_images(tmp_path / "set.npz", normal_class=5)


def test_npz_split_pairs_are_read_together_train_first(tmp_path: Path) -> None:
    train, test = rng_pixels((3, 5, 5)), rng_pixels((2, 5, 5))
    # the layout of Keras' mnist.npz, in its order (test first in the archive)
    np.savez(tmp_path / "mnist.npz", x_test=test, x_train=train, y_train=[1, 2, 1], y_test=[2, 2])
    images = load_images(tmp_path / "mnist.npz")
    assert images.labels.tolist() == [1, 2, 1, 2, 2]  # (was x_test alone, without labels)
    np.testing.assert_array_equal(images.images[:, 0], np.concatenate([train, test]))
    np.savez(tmp_path / "short.npz", x_train=train, y_train=[1, 2])
    with pytest.raises(DataError, match=r"short\.npz: 2 labels y_train for 3 images x_train"):
        load_images(tmp_path / "short.npz")


def test_npz_with_several_unnamed_arrays_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "two.npz", b=rng_pixels((2, 5, 5)), a=rng_pixels((3, 5, 5)))
    with pytest.raises(DataError, match=r"two\.npz: holds several arrays \['b', 'a'\]"):
        load_images(tmp_path / "two.npz")  # (the first was taken without a word)
    np.savez(tmp_path / "one.npz", rng_pixels((2, 5, 5)))  # arr_0: the one array is the images
    assert load_images(tmp_path / "one.npz").images.shape == (2, 1, 5, 5)


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, [2]]
    np.save(tmp_path / "objects.npy", objects, allow_pickle=True)
    with pytest.raises(DataError, match=r"objects\.npy: pickled \(object\) arrays are refused"):
        load_images(tmp_path / "objects.npy")
    np.savez(tmp_path / "objects.npz", images=objects)
    with pytest.raises(DataError, match=r"objects\.npz: pickled \(object\) arrays are refused"):
        load_images(tmp_path / "objects.npz")


def test_bad_arrays(tmp_path: Path) -> None:
    np.save(tmp_path / "flat.npy", np.zeros((3, 4)))
    with pytest.raises(DataError, match=r"flat\.npy: images must be"):
        load_images(tmp_path / "flat.npy")
    pixels = np.zeros((3, 4, 4), np.float32)
    pixels[1, 2, 3] = np.inf
    np.save(tmp_path / "inf.npy", pixels)
    with pytest.raises(DataError, match=r"inf\.npy: image 1 holds a non-finite pixel"):
        load_images(tmp_path / "inf.npy")
    np.save(tmp_path / "plain.npy", np.zeros((3, 4, 4)))
    with pytest.raises(DataError, match=r"plain\.npy: normal_class=1 needs class labels"):
        load_images(tmp_path / "plain.npy", normal_class=1)
    np.save(tmp_path / "short.npy", np.array([0, 1]))
    with pytest.raises(DataError, match=r"short\.npy: 2 labels for 3 images"):
        load_images(tmp_path / "plain.npy", labels_path=tmp_path / "short.npy")


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as MNIST ships them: 0 0 0x08 ndim, big-endian uint32 dims, uint8 data."""
    payload = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    payload += struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path: Path, suffix: str) -> None:
    pixels = rng_pixels((6, 4, 5))
    labels = np.array([1, 0, 1, 9, 1, 0], dtype=np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", pixels)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels)

    images = load_images(
        tmp_path / f"train-images-idx3-ubyte{suffix}",
        labels_path=tmp_path / f"train-labels-idx1-ubyte{suffix}",
    )
    assert images.images.shape == (6, 1, 4, 5)
    np.testing.assert_array_equal(images.images[:, 0], pixels)
    assert images.labels.tolist() == labels.tolist()
    assert (
        len(
            load_images(
                images.source,
                labels_path=tmp_path / f"train-labels-idx1-ubyte{suffix}",
                normal_class=1,
            )
        )
        == 3
    )


def test_corrupt_idx_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "t10k-images.idx3-ubyte"
    write_idx(good, rng_pixels((2, 3, 3)))
    truncated = tmp_path / "cut-idx3-ubyte"
    truncated.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"cut-idx3-ubyte: IDX header announces shape \(2, 3, 3\)"):
        load_images(truncated)
    garbage = tmp_path / "junk-idx3-ubyte"
    garbage.write_bytes(b"\x01\x02\x03\x04" + bytes(20))
    with pytest.raises(DataError, match=r"junk-idx3-ubyte: not an IDX file"):
        load_images(garbage)


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_png_class_folders_and_normal_class(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    pictures = {}
    for c, cls in enumerate(("circle", "square", "blob")):
        for i in range(3):
            pixels = rng_pixels((6, 5, 3), seed=10 * c + i)
            write_png(root / cls / f"{i}.png", pixels)
            pictures[(cls, i)] = pixels
    (root / "notes.txt").parent.mkdir(exist_ok=True)

    images = load_images(root)
    assert images.class_names == ("blob", "circle", "square")
    assert images.images.shape == (9, 3, 6, 5)
    assert images.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(images.images[4], np.moveaxis(pictures[("circle", 1)], 2, 0))

    squares = load_images(root, normal_class="square")
    assert squares.labels.tolist() == [2, 2, 2]
    np.testing.assert_array_equal(squares.images[0], np.moveaxis(pictures[("square", 0)], 2, 0))
    assert load_images(root, normal_class=1).labels.tolist() == [1, 1, 1]
    with pytest.raises(
        DataError, match=r"shapes: unknown class 'star'.*0=blob, 1=circle, 2=square"
    ):
        load_images(root, normal_class="star")


def test_flat_png_folder_and_mismatched_images(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for i in range(3):
        write_png(root / f"{i}.png", rng_pixels((4, 4), seed=i))
    images = load_images(root)
    assert images.images.shape == (3, 1, 4, 4) and images.labels is None
    with pytest.raises(DataError, match=r"flat: normal_class=0 needs class labels"):
        load_images(root, normal_class=0)

    write_png(root / "3.png", rng_pixels((5, 4)))
    with pytest.raises(DataError, match=r"3\.png: .*must share size and mode"):
        load_images(root)
    write_png(root / "3.png", rng_pixels((4, 4, 3)))
    with pytest.raises(DataError, match=r"3\.png: mode RGB"):
        load_images(root)


def test_digits() -> None:
    digits = load_images("digits")
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == np.float32
    assert digits.images.min() == 0 and digits.images.max() == 16
    assert digits.labels.dtype == np.int64 and digits.labels[:10].tolist() == list(range(10))
    sevens = load_images("digits", normal_class=7)
    assert len(sevens) == int((digits.labels == 7).sum()) and set(sevens.labels) == {7}


def test_split_images_is_seeded_and_disjoint(tmp_path: Path) -> None:
    pixels = np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1)
    images = ImageSet(pixels, np.arange(50, dtype=np.int64) % 2, "fifty.npy")

    parts = split_images(images, seed=3)
    again = split_images(images, seed=3)
    other = split_images(images, seed=4)

    assert [len(parts[p]) for p in PARTS] == [31, 7, 7, 5]
    seen = [parts[p].images.ravel().tolist() for p in PARTS]
    assert sorted(sum(seen, [])) == list(range(50))
    for part in PARTS:
        assert parts[part].digest() == again[part].digest()
        np.testing.assert_array_equal(parts[part].labels, parts[part].images.ravel() % 2)
    assert parts["train"].digest() != other["train"].digest()
    with pytest.raises(DataError, match=r"fifty\.npy: the validation part would be empty"):
        split_images(images.subset(np.arange(5)))


def test_image_digest_ignores_the_path_and_sees_pixels(tmp_path: Path) -> None:
    pixels = rng_pixels((3, 4, 4))
    np.save(tmp_path / "a.npy", pixels)
    np.save(tmp_path / "b.npy", pixels)
    digest = load_images(tmp_path / "a.npy").digest()
    assert load_images(tmp_path / "b.npy").digest() == digest
    pixels[0, 0, 0] ^= 1
    np.save(tmp_path / "b.npy", pixels)
    assert load_images(tmp_path / "b.npy").digest() != digest


def test_times_a_table_cannot_hold_are_refused_not_wrapped(tmp_path: Path) -> None:
    """Times are held as nanoseconds since 1970 in int64 (the years 1677 to 2262): later ones,
    as epoch ms or ISO text, came out of the cast wrapped around (2300 read as 1715) and were
    trained and scored so, without a word."""
    for stamp in ("10000000000000", "2300-01-01T00:00:00Z", "1582-10-15T00:00:00"):
        path = write_csv(tmp_path / "far.csv", f"ts,x\n2024-01-01T00:00:00Z,1\n{stamp},2\n")
        if stamp.isdigit():
            path = write_csv(tmp_path / "far.csv", f"ts,x\n1704067200000,1\n{stamp},2\n")
        with pytest.raises(
            DataError,
            match=r"far\.csv: column 'ts', data row 2: .* outside the years 1678 to 2261",
        ):
            load_series(path, time_col="ts")


def test_fractional_epoch_ms_are_cut_as_the_worker_cuts_them(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "ms.csv", "ts,x\n1704067200000.7,1\n1704067201000.2,2\n")
    times = load_series(path, time_col="ts").frame["ts"].to_numpy()
    assert times.astype("datetime64[ms]").astype(np.int64).tolist() == [
        1704067200000,
        1704067201000,
    ]
    assert (times == times.astype("datetime64[ms]")).all()  # no fraction of a millisecond left


def test_rows_labelled_anomalous_set_no_scale_in_memory_or_out_of_core(tmp_path: Path) -> None:
    from pipeline.tools.synthetic import write_parquet_series
    from training.data.out_of_core import prepare_streamed
    from training.data.prepared import prepare_series
    from training.job import TrainSettings

    root = write_parquet_series(tmp_path / "ds", n_keys=2, n=1200, days=2, label_every=0)
    table = load_series(root, time_col="ts", key_col="machine")
    frame = table.frame.copy()
    frame["label"] = 0
    clean = split_series(table, (0.6, 0.15, 0.15, 0.1))["train"].values()
    glitch = frame.index[frame["machine"] == "m0"][100:103]  # inside the train split
    frame.loc[glitch, "s0"] = 1000.0
    frame.loc[glitch, "label"] = 1
    frame.to_csv(tmp_path / "glitch.csv", index=False)
    (tmp_path / "pq").mkdir()
    frame.to_parquet(tmp_path / "pq" / "part.parquet", index=False)
    common = dict(time_col="ts", key_col="machine", label_col="label", window=16, stride=4)
    expected = np.std(clean, axis=0)
    in_memory = prepare_series(TrainSettings(data=str(tmp_path / "glitch.csv"), **common))
    streamed = prepare_streamed(
        TrainSettings(data=str(tmp_path / "pq"), out_of_core=True, **common), "standard"
    )
    for scaler in (in_memory.scaler, streamed.scaler):
        np.testing.assert_allclose(scaler.scale, expected, rtol=2e-3)
