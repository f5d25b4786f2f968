"""Per-key baselines: training statistics per key, warm-up of unseen keys, level following,
their state, and the artifact's check of them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import orjson
import pandas as pd
import pytest

from pipeline.batch import score_window_set
from pipeline.detector import Scaler, WindowSpec, cut_windows, load_detector, sliding_windows
from pipeline.detector.baselines import KeyStats, short_span_ratio
from pipeline.detector.key_baselines import FOLLOW_BLOCK, BaselineConfig, KeyBaselines
from pipeline.errors import ArtifactError, ConfigError
from tests.fleet_support import fleet_frame, machine, train_on
from tests.helpers import edit_manifest

W, S, F = 8, 2, 3


def _stub(rho=None, keys=None, scale=(1.0, 2.0, 4.0), calendar=()):
    stats = KeyStats({10 * W: tuple(rho)} if rho else {}, keys or {})
    return SimpleNamespace(
        input=SimpleNamespace(kind="series", window=WindowSpec(W, S), calendar=calendar),
        scaler=Scaler("standard", (0.0,) * F, tuple(scale)),
        baselines=stats,
    )


def _series(n, seed=0, level=(5.0, -3.0, 100.0), sd=(1.0, 0.5, 2.0)):
    rng = np.random.default_rng(seed)
    return (np.asarray(level) + rng.normal(size=(n, F)) * np.asarray(sd)).astype(np.float32)


def _windows(values):
    return sliding_windows(values, WindowSpec(W, S))


def test_warm_up_takes_ten_windows_of_readings_then_learns_level_and_ratio_scale():
    rho = (0.5, 1.0, 0.25)
    part = KeyBaselines(BaselineConfig(warmup=True), _stub(rho))
    values = _series(400)
    windows = _windows(values)
    warm, now = part.take("k", windows)
    # the first window brings W readings, each next one S: 10 W readings need 1 + (80 - 8) / 2
    assert warm == 1 + (10 * W - W) // S and now == len(windows) - warm
    center, scale = part.scaling("k")
    first = values[: 10 * W].astype(np.float64)
    np.testing.assert_allclose(center, first.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(scale, first.std(axis=0) / np.asarray(rho), rtol=1e-5)
    center_rule = KeyBaselines(BaselineConfig(warmup=True, scale_rule="center"), _stub(rho))
    center_rule.take("k", windows)
    np.testing.assert_array_equal(center_rule.scaling("k")[1], [1.0, 2.0, 4.0])


def test_keys_seen_in_training_skip_the_warm_up_and_others_keep_the_scaler_when_it_is_off():
    trained = {"seen": ((1.0, 2.0, 3.0), (0.5, 0.5, 0.5), 100)}
    on = KeyBaselines(BaselineConfig(warmup=True), _stub(keys=trained))
    off = KeyBaselines(BaselineConfig(warmup=False), _stub(keys=trained))
    windows = _windows(_series(200))
    assert on.take("seen", windows) == (0, len(windows))
    np.testing.assert_array_equal(on.scaling("seen")[0], [1.0, 2.0, 3.0])
    assert off.take("unseen", windows) == (0, len(windows))
    np.testing.assert_array_equal(off.scaling("unseen")[1], [1.0, 2.0, 4.0])


def _replay(make, windows, chunk, normal, restart_at=None):
    """Windows fed `chunk` at a time as a stream takes them (what `take` holds back comes first
    in the next pass); with `restart_at`, the state goes through JSON after that many passes into
    a new object. Returns the center each scored window was scaled with, and the object."""
    part, centers, at, passes = make(), [], 0, 0
    while at < len(windows):
        hi = min(at + chunk, len(windows))
        warm, take = part.take("k", windows[at:hi])
        rows = np.arange(at + warm, at + warm + take)
        centers += [part.scaling("k")[0].copy() for _ in rows]
        part.follow("k", windows[rows], normal[rows])
        at += warm + take
        passes += 1
        if passes == restart_at:
            saved = orjson.loads(orjson.dumps(part.state("k")))
            part = make()
            part.restore("k", saved)
    return np.asarray(centers), part


def test_level_following_does_not_depend_on_batching_and_restarts_exactly():
    values = _series(3000)
    values[1500:] += np.array([2.0, 0.0, 0.0], np.float32)  # the level moves
    windows = _windows(values)
    normal = (np.arange(len(windows)) % 7) != 0  # some windows judged anomalous
    config = BaselineConfig(warmup=True, half_life=200.0)

    def make():
        return KeyBaselines(config, _stub((0.5, 1.0, 0.5)))

    a, pa = _replay(make, windows, 5000, normal)
    b, pb = _replay(make, windows, 7, normal)
    c, pc = _replay(make, windows, 50, normal, restart_at=13)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert pa.state("k") == pb.state("k") == pc.state("k")
    # the level was followed: the last baseline is near the new level, the first near the old
    assert abs(a[-1][0] - (5.0 + 2.0)) < 0.5 and abs(a[0][0] - 5.0) < 0.5
    # and it moved only at block ends
    changes = np.flatnonzero(np.any(np.diff(a, axis=0) != 0, axis=1)) + 1
    assert len(changes) and np.all(changes % FOLLOW_BLOCK == 0)


def test_state_is_small_and_packed():
    part = KeyBaselines(BaselineConfig(warmup=True, half_life=500.0), _stub((0.5, 1.0, 0.5)))
    windows = _windows(_series(600))
    warm, take = part.take("k", windows)
    part.follow("k", windows[warm : warm + take][:10], np.ones(10, bool))
    text = orjson.dumps(part.state("k"))
    assert len(text) < 200, text


def test_rho_is_short_span_over_long_run_spread():
    rng = np.random.default_rng(0)
    slow = np.cumsum(rng.normal(size=(5000, 1)), axis=0)  # a random walk: short spans see little
    white = rng.normal(size=(5000, 1))
    rho = short_span_ratio([np.hstack([slow, white])], 50)
    assert rho[0] < 0.3 and 0.9 < rho[1] <= 1.0


# -- training and the artifact ----------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyed")
    levels = {"low": -8.0, "mid": 0.0, "high": 12.0}
    frame = fleet_frame({k: machine(i, 2500, level=lv) for i, (k, lv) in enumerate(levels.items())})
    return train_on(frame, root, "keyed", keyed=True), levels, root


def test_one_key_with_key_baselines_scores_bit_for_bit_as_without(tmp_path):
    frame = fleet_frame({"only": machine(0, 1500, level=0.0)})
    plain = train_on(frame.drop(columns="machine"), tmp_path, "plain", keyed=False)
    own = train_on(frame, tmp_path, "own", keyed=True)
    assert plain.detector.threshold.value == own.detector.threshold.value
    assert plain.detector.scaler == own.detector.scaler
    windows = plain.data.raw("test")
    scaling = own.detector.key_scaling(["only"] * len(windows))
    assert scaling is not None
    np.testing.assert_array_equal(
        plain.detector.score(windows).scores, own.detector.score(windows, scaling=scaling).scores
    )


def test_keys_at_their_own_levels_are_scored_with_their_own_statistics(keyed):
    result, levels, root = keyed
    detector = load_detector(root / "keyed")
    assert set(detector.baselines.keys) == set(levels)
    fresh = {k: machine(i, 600, level=lv, skip=2500) for i, (k, lv) in enumerate(levels.items())}
    windows = cut_windows(
        [(k, np.arange(len(v)), v, None) for k, v in fresh.items()], detector.input.window
    )
    own = score_window_set(detector, windows)
    shared = detector.score(windows.windows).scores > detector.threshold.value
    for key in levels:
        rows = own["key"] == key
        assert own.loc[rows, "is_anomaly"].mean() < 0.3, key
    # the same windows under the one shared scaler: the extreme keys look anomalous throughout
    assert shared[windows.keys == "high"].mean() > 0.9
    assert shared[windows.keys == "low"].mean() > 0.9


def test_reconstruct_and_encode_take_each_keys_own_statistics_as_score_does(keyed, tmp_path):
    from pipeline.cli import main

    result, levels, root = keyed
    fresh = {k: machine(i, 400, level=lv, skip=2500) for i, (k, lv) in enumerate(levels.items())}
    data = tmp_path / "fresh.csv"
    fleet_frame(fresh).to_csv(data, index=False)
    common = ["--model", str(root / "keyed"), "--data", str(data), "--time-col", "ts"]
    common += ["--key-col", "machine"]
    assert main(["reconstruct", *common, "--out", str(tmp_path / "r.csv")]) == 0
    recon = pd.read_csv(tmp_path / "r.csv")
    for key in levels:
        mine = recon[recon["machine"] == key]
        # a key's reconstruction sits at its own level (the shared scaler put every key near
        # the fleet's mean: 12 spreads off for `high`)
        gap = (mine["s0"].mean() - fresh[key][:, 0].mean()) / fresh[key][:, 0].std()
        assert abs(gap) < 0.5, (key, gap)  # before: 1.03, 1.00 and 2.36 spreads off
    assert main(["encode", *common, "--out", str(tmp_path / "c.csv")]) == 0
    codes = pd.read_csv(tmp_path / "c.csv").filter(like="code_").to_numpy()
    keys = pd.read_csv(tmp_path / "c.csv")["key"].to_numpy()
    spread = [codes[keys == k].mean(axis=0) for k in levels]
    # the codes no longer mostly say which key: the keys' mean codes lie close together
    assert np.ptp(np.stack(spread), axis=0).max() < 3 * codes.std(axis=0).max()


def test_edited_baselines_are_refused(keyed, tmp_path):
    _, _, root = keyed
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root / "keyed", copy)

    def change(manifest: dict) -> None:
        manifest["baselines"]["keys"]["high"]["mean"][0] += 1.0

    edit_manifest(copy, change)  # sealed again: the baselines' own SHA-256 tells
    with pytest.raises(ArtifactError, match="SHA-256") as info:
        load_detector(copy)
    assert info.value.reason == "sha256"


def test_key_baselines_need_a_key_column_and_the_standard_scaler(tmp_path):
    frame = fleet_frame({"a": machine(0, 600, level=0.0)})
    with pytest.raises(ConfigError, match="key-col"):
        train_on(frame.drop(columns="machine"), tmp_path, "x", keyed=True)
    with pytest.raises(ConfigError, match="standard"):
        train_on(frame, tmp_path, "y", keyed=True, scaler="minmax")


def test_a_state_saved_under_other_training_statistics_is_not_restored():
    """Retrained on key `a` at another level, promoted, then restarted: the record holds v1's
    statistics for `a`; v2's own must score it (v1's made every window anomalous)."""
    v1 = {"a": ((-5.0, -5.0, -5.0), (1.0, 1.0, 1.0), 500), "gone": ((1.0,) * 3, (2.0,) * 3, 500)}
    v2 = {"a": ((20.0, 20.0, 20.0), (1.0, 1.0, 1.0), 500)}
    config = BaselineConfig(warmup=True, half_life=50.0)
    old = KeyBaselines(config, _stub(keys=v1))
    for key in ("a", "gone", "learned"):
        windows = _windows(_series(600, level=(-5.0, -5.0, -5.0)))
        warm, now = old.take(key, windows)
        old.follow(key, windows[warm : warm + now], np.ones(now, bool))
    saved = {key: orjson.loads(orjson.dumps(old.state(key))) for key in old.keys}
    new = KeyBaselines(config, _stub(keys=v2))
    for key, entry in saved.items():
        new.restore(key, entry)
    assert new.scaling("a")[0].tolist() == [20.0, 20.0, 20.0]  # v2's, not v1's followed level
    assert not new.ready("gone")  # trained only under v1: learns again, as a hot reload has it
    assert new.scaling("learned")[0].tolist() == old.scaling("learned")[0].tolist()
    # under the same version everything continues, the followed level included
    same = KeyBaselines(config, _stub(keys=v1))
    for key, entry in saved.items():
        same.restore(key, entry)
    for key in ("a", "gone", "learned"):
        assert same.scaling(key)[0].tolist() == old.scaling(key)[0].tolist()
    assert old.scaling("a")[0].tolist() != [-5.0, -5.0, -5.0]  # it had followed


def test_calendar_inputs_keep_the_detectors_center_and_scale_for_a_learned_key():
    calendar = ("tod_sin",)  # the last feature is a function of the time
    part = KeyBaselines(
        BaselineConfig(warmup=True, half_life=20.0), _stub(rho=(1.0, 1.0, 1.0), calendar=calendar)
    )
    values = _series(1000, level=(5.0, -3.0, 0.9), sd=(1.0, 0.5, 0.01))  # mid-morning only
    windows = _windows(values)
    warm, now = part.take("k", windows)
    center, scale = part.scaling("k")
    assert center[2] == 0.0 and scale[2] == 4.0  # the detector's, not 0.9 and 0.01
    assert center[0] != 0.0 and scale[0] != 1.0  # the sensors' own
    part.follow("k", windows[warm : warm + now], np.ones(now, bool))
    assert part.scaling("k")[0][2] == 0.0  # not followed either


def test_level_following_without_per_key_baselines_is_refused_not_ignored():
    from pipeline.detector.key_baselines import check_following

    following = BaselineConfig(half_life=100.0)
    with pytest.raises(ConfigError, match="^level_half_life: follows per-key baselines"):
        check_following(following, _stub())  # nothing to follow: it did nothing
    check_following(BaselineConfig(warmup=True, half_life=100.0), _stub())
    trained = {"a": ((0.0,) * F, (1.0,) * F, 500)}
    check_following(following, _stub(keys=trained))  # the trained keys have their own


def test_adaptive_counts_beyond_the_int64_counters_are_refused_at_start():
    from pipeline.worker.settings import WorkerSettings

    with pytest.raises(ConfigError, match="^adaptive_max_freeze: must be <="):
        WorkerSettings.build(
            model="m", bootstrap_servers="b:1", input_topic=("t",), adaptive_max_freeze=10**19
        )
