"""Windows and scalers: the shared rules of the detector core."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.detector import Scaler, WindowSpec, cut_windows, sliding_windows, window_starts
from pipeline.errors import ConfigError, DataError
from tests.helpers import peak_growth


def test_windows_follow_length_and_stride():
    values = np.arange(20, dtype=np.float32).reshape(10, 2)
    spec = WindowSpec(4, 3)
    windows = sliding_windows(values, spec)
    assert windows.shape == (3, 4, 2)
    np.testing.assert_array_equal(windows[1], values[3:7])
    np.testing.assert_array_equal(window_starts(10, spec), [0, 3, 6])
    ends = [t for t in range(10) if spec.ends_window(t)]
    assert ends == [3, 6, 9], "the streaming rule must match the batch windows"


def test_too_short_series_is_a_clear_error():
    with pytest.raises(DataError, match="too few for one window of 8"):
        sliding_windows(np.zeros((5, 2)), WindowSpec(8))


def test_invalid_window_names_the_setting():
    with pytest.raises(ConfigError, match="stride"):
        WindowSpec(4, 0)


def test_cut_windows_per_key_with_labels():
    times = np.arange(6)
    labels = np.array([0, 0, 0, 1, 0, 0])
    groups = [
        ("a", times, np.ones((6, 2)), labels),
        ("b", times[:2], np.ones((2, 2)), labels[:2]),  # too short: no windows, no error
    ]
    out = cut_windows(groups, WindowSpec(3, 1))
    assert list(out.keys) == ["a"] * 4
    np.testing.assert_array_equal(out.start_times, [0, 1, 2, 3])
    np.testing.assert_array_equal(out.end_times, [2, 3, 4, 5])
    np.testing.assert_array_equal(out.end_labels, [False, True, False, False])
    np.testing.assert_array_equal(out.any_labels, [False, True, True, True])


@pytest.mark.parametrize("kind", ["standard", "minmax", "robust"])
def test_constant_feature_does_not_divide_by_zero(kind: str):
    rng = np.random.default_rng(0)
    samples = np.column_stack([rng.normal(5, 2, 500), np.full(500, 3.0)])
    scaler = Scaler.fit(kind, samples)
    out = scaler.transform(samples)
    assert np.isfinite(out).all()
    assert scaler.scale[1] == 1.0
    np.testing.assert_allclose(scaler.inverse_transform(out), samples, atol=1e-5)
    assert Scaler.from_dict(scaler.to_dict()) == scaler


def test_standard_scaler_statistics():
    samples = np.random.default_rng(1).normal(10, 4, size=(20000, 1))
    out = Scaler.fit("standard", samples).transform(samples)
    assert abs(out.mean()) < 1e-3 and abs(out.std() - 1) < 1e-3


def test_scaler_transforms_channels_of_images():
    images = np.random.default_rng(0).uniform(0, 16, size=(10, 3, 4, 4))
    scaler = Scaler.fit("minmax", np.moveaxis(images, 1, -1).reshape(-1, 3))
    out = scaler.transform(images, axis=1)
    assert out.min() >= 0 and out.max() <= 1 + 1e-6


def test_cut_windows_keeps_the_series_once_not_each_window():
    """Windows overlap: at stride 1 a copy of them all is W times the series (here 32)."""
    growth = peak_growth(
        """
        import numpy as np
        from pipeline.detector import WindowSpec, cut_windows
        rng = np.random.default_rng(0)
        groups = [(k, np.arange(50_000), rng.standard_normal((50_000, 16)), None) for k in "ab"]
        spec = WindowSpec(length=32, stride=1)
        """,
        "windows = cut_windows(groups, spec)",
        "2 * 50_000 * 16 * 4",
    )
    # the series once in float32, with each window's key, times and first row (before: 32 x)
    assert growth < 4.0, growth


def test_windows_cut_on_demand_are_the_windows_of_each_key():
    rng = np.random.default_rng(0)
    series = {"a": rng.normal(size=(40, 3)), "b": rng.normal(size=(29, 3))}
    spec = WindowSpec(length=8, stride=3)
    groups = [(k, np.arange(len(v)), v, None) for k, v in series.items()]
    lazy = cut_windows(groups, spec).windows
    whole = np.concatenate([sliding_windows(v, spec) for v in series.values()])
    assert lazy.shape == whole.shape == (11 + 8, 8, 3) and len(lazy) == len(whole)
    np.testing.assert_array_equal(np.asarray(lazy), whole)
    pick = np.array([18, 0, 11, 11, 4])
    mask = np.arange(len(whole)) % 3 == 1
    for index in (5, -1, slice(2, 14), slice(None, None, 4), pick, mask, (pick, -1), (3, 2)):
        np.testing.assert_array_equal(lazy[index], whole[index])
    np.testing.assert_array_equal(np.asarray(lazy.subset(pick)), whole[pick])
    assert lazy[3:5].dtype == np.float32


def test_keys_with_different_features_are_a_clear_error():
    groups = [
        ("a", np.arange(10), np.zeros((10, 2)), None),
        ("b", np.arange(10), np.zeros((10, 3)), None),
    ]
    with pytest.raises(DataError, match="number of features"):
        cut_windows(groups, WindowSpec(length=4, stride=1))
