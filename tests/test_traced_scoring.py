"""The CPU scoring pass runs as one traced graph (`pipeline.detector.traced`): it must give what
the pass op by op gives, bit for bit, for every model kind and backbone, both scores, with and
without attribution and per-window scaling, in any batch."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.detector import Detector, InputSpec, ModelConfig, Scaler, WindowSpec, build_model
from pipeline.detector import traced as traced_module
from pipeline.detector.adaptive_stage import window_extremes
from pipeline.detector.scoring import fit_score_stats
from pipeline.errors import DataError
from tests.test_detector_contract import COMBOS

WINDOW, FEATURES = 16, 3


def _detector(kind: str, backbone: str, terms: bool, windows: np.ndarray) -> Detector:
    config = ModelConfig(
        kind=kind,
        backbone=backbone,
        input_shape=(WINDOW, FEATURES),
        hidden=(32, 16) if backbone == "dense" else (8, 16),
        code_size=4,
    )
    torch.manual_seed(0)
    model = build_model(config)
    scaler = Scaler.fit("standard", windows.reshape(-1, FEATURES))
    if kind == "pca":
        model.fit(torch.from_numpy(scaler.transform(windows, axis=2)))
    detector = Detector(
        InputSpec("series", tuple(f"s{i}" for i in range(FEATURES)), WindowSpec(WINDOW, 4)),
        scaler,
        config,
        model,
    )
    if terms:
        values = detector.term_statistics(windows)
        detector.score_stats = fit_score_stats(values, values)
    return detector


def _eager(detector: Detector, windows: np.ndarray, **options):
    fresh = Detector(
        detector.input,
        detector.scaler,
        detector.config,
        detector.model,
        score_stats=detector.score_stats,
    )
    original = traced_module._trace
    traced_module._trace = lambda *args: None
    try:
        return fresh.score(windows, **options)
    finally:
        traced_module._trace = original


FIELDS = ("scores", "per_feature", "per_step", "terms", "extremes")


def _windows_and_scaling(seed: int, n: int) -> tuple[np.ndarray, tuple]:
    """`n` random windows and a per-window (center, scale) for them."""
    rng = np.random.default_rng(seed)
    windows = rng.normal(size=(n, WINDOW, FEATURES)).astype(np.float32)
    scaling = (
        rng.normal(size=(n, FEATURES)).astype(np.float32),
        rng.uniform(0.5, 2, size=(n, FEATURES)).astype(np.float32),
    )
    return windows, scaling


def _assert_same(got, want, context=None) -> None:
    """Every field of two `Scores` bit for bit (or both absent)."""
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), (name, context)
        if a is not None:
            assert np.array_equal(a, b), (name, context)


@pytest.mark.parametrize("terms", [False, True])
@pytest.mark.parametrize(("kind", "backbone"), COMBOS)
def test_the_traced_pass_scores_as_the_eager_one_bit_for_bit(kind, backbone, terms):
    windows, scaling = _windows_and_scaling(1, 40)
    detector = _detector(kind, backbone, terms, windows)
    for options in (
        {"batch_size": 7},
        {"batch_size": 64},
        {"batch_size": 1},
        {"batch_size": 16, "attribution": False},
        {"batch_size": 9, "scaling": scaling},
    ):
        got = detector.score(windows, **options)
        want = _eager(detector, windows, **options)
        _assert_same(got, want, options)
    traced = detector._pass._traced
    assert traced[(True, 0)] is not None and traced[(False, 0)] is not None, "not traced"


@pytest.mark.parametrize("terms", [False, True])
@pytest.mark.parametrize(("kind", "backbone"), COMBOS)
def test_a_batch_in_slices_scores_as_the_eager_pass_in_one_piece(
    monkeypatch, kind, backbone, terms
):
    """A large CPU batch goes through the graph slice by slice (`slice_rows`): each window's
    results are the ones it has in one piece, per-window scaling sliced with it."""
    asked = []

    def eight(shape, threads):
        asked.append((shape, threads))
        return 8

    monkeypatch.setattr(traced_module, "slice_rows", eight)
    windows, scaling = _windows_and_scaling(4, 43)
    detector = _detector(kind, backbone, terms, windows)
    for options in (
        {},
        {"attribution": False},
        {"scaling": scaling},
        {"extremes": 2, "scaling": scaling},
        {"extremes": FEATURES, "attribution": False},
    ):
        got = detector.score(windows, batch_size=43, **options)
        want = _eager(detector, windows, batch_size=43, **options)
        _assert_same(got, want, options)
    assert all(graph is not None for graph in detector._pass._traced.values())
    assert len(detector._pass._traced) == 4
    assert set(asked) == {((WINDOW, FEATURES), torch.get_num_threads())}


@pytest.mark.parametrize("n", [1, 6, 8, 43])
@pytest.mark.parametrize("traced", [True, False])
def test_the_pass_takes_each_windows_extremes_as_window_extremes(monkeypatch, n, traced):
    """With `extremes`, the pass also gives each window's minimum and maximum of its first
    features, the values `window_extremes` gives, traced in slices (with rows padded to whole
    blocks) or op by op; the scores are the ones without them."""
    monkeypatch.setattr(traced_module, "slice_rows", lambda shape, threads: 4)
    windows, _ = _windows_and_scaling(5, n)
    detector = _detector("undercomplete", "dense", True, windows)
    if not traced:
        monkeypatch.setattr(traced_module, "_trace", lambda *args: None)
    for first in (1, FEATURES):
        got = detector.score(windows, extremes=first)
        want = window_extremes(windows[..., :first])
        assert [a.dtype for a in got.extremes] == [np.float32, np.float32]
        assert all(map(np.array_equal, got.extremes, want))
        _assert_same(replace(got, extremes=None), detector.score(windows))
    assert (detector._pass._traced[(True, FEATURES)] is not None) == traced
    empty = detector.score(windows[:0], extremes=2).extremes
    assert [a.shape for a in empty] == [(0, 2), (0, 2)]


def test_window_extremes_are_refused_for_images():
    images = np.random.default_rng(6).uniform(size=(3, 1, 8, 8)).astype(np.float32)
    config = ModelConfig(kind="undercomplete", backbone="dense", input_shape=(1, 8, 8))
    detector = Detector(
        InputSpec("image", image_shape=(1, 8, 8)),
        Scaler.fit("standard", images.reshape(-1, 1)),
        config,
        build_model(config),
    )
    assert len(detector.score(images).scores) == 3
    with pytest.raises(DataError, match="series windows only"):
        detector.score(images, extremes=1)


def test_slices_are_whole_row_blocks_of_about_the_set_size_per_thread():
    assert traced_module.slice_rows((64, 8)) == traced_module.CPU_SLICE_VALUES // 512
    assert traced_module.slice_rows((64, 8), 2) == 2 * traced_module.CPU_SLICE_VALUES // 512
    assert traced_module.slice_rows((1, 28, 28)) % traced_module.ROW_BLOCK == 0
    assert traced_module.slice_rows((3, 1024, 1024)) == traced_module.ROW_BLOCK


@pytest.mark.parametrize(("refused", "by_graph"), [("trace", False), ("script", True)])
def test_a_model_not_traced_or_a_loop_not_scripted_still_scores_the_same(
    monkeypatch, caplog, refused, by_graph
):
    """A model that cannot be traced is scored op by op, with a warning; where torch cannot
    script the slice loop, the traced graph scores each batch in one piece."""
    rng = np.random.default_rng(2)
    windows = rng.normal(size=(21, WINDOW, FEATURES)).astype(np.float32)
    detector = _detector("undercomplete", "dense", True, windows)
    want = _eager(detector, windows)

    def refuse(*args, **kwargs):
        raise RuntimeError(f"no {refused} here")

    monkeypatch.setattr(torch.jit, refused, refuse)
    monkeypatch.setattr(traced_module, "slice_rows", lambda shape, threads: 4)
    with caplog.at_level(logging.WARNING, logger="pipeline.detector.traced"):
        got = detector.score(windows)
    assert (detector._pass._traced[(True, 0)] is not None) == by_graph
    assert ("could not be traced" in caplog.text) == (not by_graph)
    _assert_same(got, want)


@pytest.mark.parametrize("backbone", ["dense", "conv"])
def test_images_score_the_same_traced_one_at_a_time_or_many(backbone):
    images = np.random.default_rng(3).uniform(size=(6, 1, 8, 8)).astype(np.float32)
    config = ModelConfig(
        kind="undercomplete",
        backbone=backbone,
        input_shape=(1, 8, 8),
        hidden=(32, 16) if backbone == "dense" else (8, 16),
        code_size=4,
    )
    torch.manual_seed(0)
    detector = Detector(
        InputSpec("image", image_shape=(1, 8, 8)),
        Scaler.fit("standard", images.reshape(-1, 1)),
        config,
        build_model(config),
    )
    first = detector.score(images[:1], batch_size=1)  # traced on a batch of one image
    got = detector.score(images, batch_size=4)
    want = _eager(detector, images, batch_size=4)
    assert detector._pass._traced[(True, 0)] is not None
    assert np.array_equal(got.scores, want.scores)
    assert np.array_equal(got.pixel_map, want.pixel_map)
    assert np.array_equal(first.scores, want.scores[:1])


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize(("kind", "backbone"), COMBOS)
def test_a_window_scores_the_same_alone_or_in_any_batch(kind, backbone, threads):
    """The stream scores whatever batches its polls make, on one thread; the batch path one
    large batch on all of them. Both must give each window the same score, bit for bit."""
    rng = np.random.default_rng(3)
    windows = rng.normal(size=(45, WINDOW, FEATURES)).astype(np.float32)
    detector = _detector(kind, backbone, True, windows)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = detector.score(windows, batch_size=64)
        torch.set_num_threads(threads)
        for size in (1, 2, 3, 5, 6, 7, 9, 11, 17, 27, 64):
            cut = detector.score(windows, batch_size=size)
            for name in FIELDS:
                a, b = getattr(cut, name), getattr(whole, name)
                assert np.array_equal(a, b), (name, size)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("kind", "shape", "hidden", "code"),
    [("undercomplete", (64, 8), (128, 64), 16), ("pca", (16, 6), (), 4)],
)
def test_a_wider_window_scores_the_same_alone_or_in_any_batch(kind, shape, hidden, code, threads):
    """The BLAS computes a row of a matrix product by another kernel, summing in another order,
    unless the rows come in whole blocks of its tile: blocks of 4 were not enough for a window of
    64 x 8 readings into 128 units (the worker benchmarks' model) or a PCA of 16 x 6 into 4
    (scores in passes of 1 to 4 windows differed by 1.5e-5 from one pass of 39)."""
    rng = np.random.default_rng(7)
    windows = rng.normal(2.0, 1.5, size=(200, *shape)).astype(np.float32)
    config = ModelConfig(
        kind=kind, backbone="dense", input_shape=shape, hidden=hidden, code_size=code
    )
    torch.manual_seed(0)
    model = build_model(config)
    scaler = Scaler.fit("standard", windows.reshape(-1, shape[1]))
    if kind == "pca":
        model.fit(torch.from_numpy(scaler.transform(windows, axis=2)))
    names = tuple(f"s{i}" for i in range(shape[1]))
    detector = Detector(InputSpec("series", names, WindowSpec(shape[0], 4)), scaler, config, model)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = detector.score(windows, batch_size=256).scores
        torch.set_num_threads(threads)
        for size in (1, 2, 3, 4, 5, 8, 13, 16, 24, 40, 100):
            assert np.array_equal(detector.score(windows, batch_size=size).scores, whole), size
    finally:
        torch.set_num_threads(before)
