"""The other uses of a trained detector, through the command line: `encode` (dimensionality
reduction), `reconstruct` (denoising) and `sample` (VAE generation), with the claim each rests on
checked on scikit-learn digits against a baseline that a broken model would not beat."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from pipeline.cli import main
from pipeline.detector import ModelConfig, load_detector
from tests.helpers import register_result, series_frame, train_series_detector
from training.data.images import load_images
from training.fit import FitConfig
from training.job import CalibrationSettings, TrainSettings, train
from training.uses import overlap_average

N_FIT = 1300  # of 1797 digits: the rest are held out from every model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: one thread trains them several times faster than two that wait
    on each other when the machine is busy. The previous setting is restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    """Seeded split of the digits into a part the models see and a held-out part, as .npz files
    with labels (pixel values 0..16)."""
    root = tmp_path_factory.mktemp("digits")
    source = load_digits()
    order = np.random.default_rng(0).permutation(len(source.images))
    images = source.images.astype(np.float32)[:, None]
    parts = {"fit": order[:N_FIT], "held": order[N_FIT:]}
    out = {"root": root}
    for name, index in parts.items():
        np.savez(root / f"{name}.npz", images=images[index], labels=source.target[index])
        out[name] = (images[index], source.target[index])
    return out


def _train_digits(digits: dict, name: str, epochs: int, **model):
    settings = TrainSettings(
        data=str(digits["root"] / "fit.npz"),
        out=str(digits["root"] / name),
        fractions=(0.7, 0.1, 0.1, 0.1),
        model=ModelConfig(**{"hidden": (64,), **model}),
        fit=FitConfig(
            min_steps=0, schedule="constant", epochs=epochs, batch_size=64, lr=3e-3, patience=0
        ),
        calibration=CalibrationSettings(method="quantile", target_fpr=0.01),
        device="cpu",
    )
    return train(settings)


@pytest.fixture(scope="module")
def code_models(digits) -> dict:
    """An undercomplete autoencoder and PCA, both with a 2-dimensional code."""
    return {
        "ae": _train_digits(digits, "ae2", 150, kind="undercomplete", code_size=2),
        "pca": _train_digits(digits, "pca2", 1, kind="pca", code_size=2, hidden=()),
    }


@pytest.fixture(scope="module")
def denoiser(digits):
    return _train_digits(
        digits, "dae", 150, kind="denoising", corruption="gaussian", corruption_level=0.25,
        code_size=16,
    )  # fmt: skip


@pytest.fixture(scope="module")
def vae(digits):
    return _train_digits(digits, "vae", 100, kind="vae", loss="bce", code_size=4, beta=0.1)


def _run(args: list[str], capsys) -> dict:
    """Run a command with --json; its summary."""
    assert main([*args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _fails(args: list[str], capsys) -> str:
    """Run a command that must fail with a setting or data error; its message."""
    assert main(args) == 2
    return capsys.readouterr().err


def _codes(model_dir: Path, data: Path, out: Path, capsys) -> pd.DataFrame:
    _run(["encode", "--model", str(model_dir), "--data", str(data), "--out", str(out)], capsys)
    return pd.read_parquet(out) if out.suffix == ".parquet" else pd.read_csv(out)


def _code_matrix(frame: pd.DataFrame) -> np.ndarray:
    return frame.filter(like="code_").to_numpy()


# -- the three claims ----------------------------------------------------------------------------
def test_two_dimensional_codes_classify_digits_at_least_as_well_as_pca(
    digits, code_models, tmp_path, capsys
):
    """Dimensionality reduction: a 5-nearest-neighbour classifier fitted on the codes of the
    digits a model saw labels held-out digits at least as well from the autoencoder's 2-D code
    as from the first two principal components."""
    accuracy = {}
    for name, result in code_models.items():
        seen = _codes(result.artifact_dir, digits["root"] / "fit.npz", tmp_path / "a.csv", capsys)
        held = _codes(result.artifact_dir, digits["root"] / "held.npz", tmp_path / "b.csv", capsys)
        assert list(seen.columns) == ["index", "label", "code_0", "code_1"]
        knn = KNeighborsClassifier(n_neighbors=5).fit(_code_matrix(seen), seen["label"])
        accuracy[name] = knn.score(_code_matrix(held), held["label"])
    print(f"held-out 5-NN digit accuracy from 2-D codes: {accuracy}")
    assert accuracy["ae"] >= accuracy["pca"], accuracy
    assert accuracy["pca"] > 0.3, "PCA's codes must carry the digit (chance is 0.1)"


def _noisy(clean: np.ndarray, kind: str) -> np.ndarray:
    rng = np.random.default_rng(1)
    if kind == "gaussian":
        return np.clip(clean + rng.normal(0.0, 4.0, clean.shape), 0, 16).astype(np.float32)
    hit = rng.random(clean.shape) < 0.15
    return np.where(hit, np.where(rng.random(clean.shape) < 0.5, 16.0, 0.0), clean).astype(
        np.float32
    )


@pytest.mark.parametrize("noise", ["gaussian", "saltpepper"])
def test_denoised_output_is_closer_to_the_clean_digits_than_the_noisy_input(
    digits, denoiser, tmp_path, capsys, noise
):
    """Denoising: held-out digits with noise added, reconstructed by the denoising autoencoder,
    are nearer (mean squared error, pixel units) to the clean digits than the noisy input is;
    returning the input unchanged would tie, not win."""
    clean = digits["held"][0]
    noisy = _noisy(clean, noise)
    np.save(tmp_path / "noisy.npy", noisy)
    out = tmp_path / "denoised.npy"
    args = ["reconstruct", "--model", str(denoiser.artifact_dir), "--data"]
    summary = _run([*args, str(tmp_path / "noisy.npy"), "--out", str(out)], capsys)
    denoised = np.load(out)
    assert summary["rows"] == len(clean) and denoised.shape == clean.shape
    noisy_mse = float(np.mean((noisy - clean) ** 2))
    output_mse = float(np.mean((denoised - clean) ** 2))
    print(f"{noise}: MSE to clean, noisy input {noisy_mse:.3f}, denoised {output_mse:.3f}")
    assert output_mse < 0.75 * noisy_mse


def _pixel_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: mean intensity, contrast (standard deviation), share of pixels above half
    the 0..16 scale (ink)."""
    flat = images.reshape(len(images), -1)
    return {"mean": flat.mean(1), "std": flat.std(1), "ink": (flat > 8).mean(1)}


def _share_like_real(images: np.ndarray, real: np.ndarray) -> float:
    """Share of `images` whose every statistic lies within the range real digits span."""
    ranges = {k: (v.min(), v.max()) for k, v in _pixel_statistics(real).items()}
    inside = [
        (values >= ranges[k][0]) & (values <= ranges[k][1])
        for k, values in _pixel_statistics(images).items()
    ]
    return float(np.logical_and.reduce(inside).mean())


def test_vae_samples_look_like_digits_and_score_below_the_threshold(digits, vae, tmp_path, capsys):
    """Generation: digits decoded from the VAE's prior stay in the pixel range, have the pixel
    statistics of real held-out digits, and the same model scores most of them below its
    calibrated threshold. Uniform noise in the same range fails both checks."""
    out = tmp_path / "samples.npy"
    _run(["sample", "--model", str(vae.artifact_dir), "--n", "300", "--out", str(out)], capsys)
    samples = np.load(out)
    assert samples.shape == (300, 1, 8, 8)
    assert samples.min() >= 0.0 and samples.max() <= 16.0
    real = digits["held"][0]
    noise = np.random.default_rng(2).uniform(0, 16, samples.shape).astype(np.float32)
    detector = load_detector(vae.artifact_dir)
    threshold = detector.threshold.value

    def below(images: np.ndarray) -> float:
        return float(np.mean(detector.score(images, attribution=False).scores <= threshold))

    like_real, noise_like_real = _share_like_real(samples, real), _share_like_real(noise, real)
    print(
        f"VAE samples: {like_real:.1%} with real-digit pixel statistics, {below(samples):.1%} "
        f"below the threshold (uniform noise: {noise_like_real:.1%}, {below(noise):.1%})"
    )
    assert like_real >= 0.8 and noise_like_real < 0.2
    assert below(samples) >= 0.8 and below(noise) < 0.2


# -- images --------------------------------------------------------------------------------------
def test_reconstruct_to_png_files_stretches_the_training_range(digits, denoiser, tmp_path, capsys):
    """PNG output maps the training pixel range (0..16 here) to 0..255 and reads back as data;
    the .npy output keeps the input's units."""
    held = digits["root"] / "held.npz"
    args = ["reconstruct", "--model", str(denoiser.artifact_dir), "--data", str(held)]
    _run([*args, "--out", str(tmp_path / "out.npy")], capsys)
    _run([*args, "--out", str(tmp_path / "pngs")], capsys)
    exact = np.load(tmp_path / "out.npy")
    files = sorted((tmp_path / "pngs").glob("*.png"))
    assert len(files) == len(exact) and files[0].name == "00000.png"
    pictures = load_images(tmp_path / "pngs").images
    expected = np.rint(np.clip(exact / 16.0, 0, 1) * 255)
    np.testing.assert_allclose(pictures, expected, atol=1.0)


def test_sample_is_repeatable_by_seed(vae, tmp_path, capsys):
    def draw(seed: int, name: str) -> np.ndarray:
        out = tmp_path / f"{name}.npy"
        args = ["sample", "--model", str(vae.artifact_dir), "--n", "4", "--seed", str(seed)]
        _run([*args, "--out", str(out)], capsys)
        return np.load(out)

    first, again, other = draw(3, "a"), draw(3, "b"), draw(4, "c")
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_interpolation_runs_from_one_inputs_reconstruction_to_the_others(
    digits, vae, tmp_path, capsys
):
    held = digits["root"] / "held.npz"
    out = tmp_path / "line.npy"
    args = ["sample", "--model", str(vae.artifact_dir), "--interpolate", "5", "9"]
    summary = _run([*args, "--steps", "6", "--data", str(held), "--out", str(out)], capsys)
    line = np.load(out)
    assert summary["samples"] == 6 and line.shape == (6, 1, 8, 8)
    ends = load_detector(vae.artifact_dir).reconstruct(digits["held"][0][[5, 9]])
    np.testing.assert_allclose(line[[0, -1]], ends, atol=1e-4)
    steps = np.abs(np.diff(line, axis=0)).mean(axis=(1, 2, 3))
    assert (steps > 0).all(), "every step moves"


def test_sample_from_a_model_without_a_prior_is_a_clear_error(code_models, tmp_path, capsys):
    model = str(code_models["ae"].artifact_dir)
    err = _fails(["sample", "--model", model, "--n", "3", "--out", str(tmp_path / "s.npy")], capsys)
    assert "model:" in err and "undercomplete" in err and "vae" in err
    assert not (tmp_path / "s.npy").exists()


def test_interpolation_errors_name_the_setting(digits, vae, tmp_path, capsys):
    base = ["sample", "--model", str(vae.artifact_dir), "--out", str(tmp_path / "x.npy")]
    held = str(digits["root"] / "held.npz")
    assert "data:" in _fails([*base, "--interpolate", "0", "1"], capsys)
    err = _fails([*base, "--interpolate", "0", "100000", "--data", held], capsys)
    assert "interpolate:" in err and "100000" in err
    assert "steps:" in _fails(
        [*base, "--interpolate", "0", "1", "--data", held, "--steps", "1"], capsys
    )


def test_an_output_of_the_wrong_kind_is_refused_by_name(digits, denoiser, tmp_path, capsys):
    model, held = str(denoiser.artifact_dir), str(digits["root"] / "held.npz")
    err = _fails(
        ["encode", "--model", model, "--data", held, "--out", str(tmp_path / "c.txt")], capsys
    )
    assert "out:" in err and ".parquet" in err
    err = _fails(
        ["reconstruct", "--model", model, "--data", held, "--out", str(tmp_path / "r.csv")], capsys
    )
    assert "out:" in err and "PNG" in err
    used = tmp_path / "used"
    used.mkdir()
    (used / "99999.png").write_bytes(b"an older run's picture")  # would be read back with them
    plain = tmp_path / "plain"
    plain.write_text("a file")  # failed after every image was reconstructed
    for out, said in ((used, "holds files"), (plain, "is a file")):
        err = _fails(["reconstruct", "--model", model, "--data", held, "--out", str(out)], capsys)
        assert said in err and err.count("\n") == 1
    assert (used / "99999.png").read_bytes() == b"an older run's picture"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_encode_through_the_registry_matches_the_folder(
    digits, code_models, tmp_path, capsys, mlflow_embedded, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # MLflow puts run artifacts under ./mlruns
    result = code_models["ae"]
    version = register_result(mlflow_embedded, result, "digit-codes")
    held = digits["root"] / "held.npz"
    by_folder = _codes(result.artifact_dir, held, tmp_path / "folder.parquet", capsys)
    for uri in ("models:/digit-codes@challenger", f"models:/digit-codes/{version}"):
        by_uri = _codes(uri, held, tmp_path / "registry.parquet", capsys)
        pd.testing.assert_frame_equal(by_uri, by_folder)


# -- series --------------------------------------------------------------------------------------
FEATURES = [f"s{i}" for i in range(6)]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Two machines' readings in units far from the scaled ones (around 300, spread ~20), so a
    missing inverse scaling shows; a small undercomplete detector and a small VAE on them."""
    root = tmp_path_factory.mktemp("series")
    frame = series_frame(n_keys=2, n=1000)
    frame[FEATURES] = frame[FEATURES] * 20.0 + 300.0
    frame["label"] = 0
    data = root / "series.csv"
    frame.to_csv(data, index=False)
    return {
        "data": data,
        "frame": frame,
        "ae": train_series_detector(data, root / "ae"),
        "vae": train_series_detector(data, root / "vae", kind="vae"),
    }


def _series_args(series, command: str, model: str, out: Path) -> list[str]:
    return [command, "--model", str(series[model].artifact_dir), "--data", str(series["data"]),
            "--key-col", "machine", "--out", str(out)]  # fmt: skip


def test_encode_gives_one_code_row_per_scored_window(series, tmp_path, capsys):
    _run(_series_args(series, "encode", "ae", tmp_path / "codes.parquet"), capsys)
    _run(_series_args(series, "score", "ae", tmp_path / "scores.parquet"), capsys)
    codes = pd.read_parquet(tmp_path / "codes.parquet")
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert list(codes.columns) == ["key", "window_start", "window_end"] + [
        f"code_{i}" for i in range(8)
    ]
    ids = ["key", "window_start", "window_end"]
    pd.testing.assert_frame_equal(codes[ids], scores[ids])
    assert np.isfinite(_code_matrix(codes)).all() and _code_matrix(codes).std(axis=0).min() > 0


def test_reconstructed_series_is_in_the_input_units_and_columns(series, tmp_path, capsys):
    out = tmp_path / "recon.csv"
    summary = _run(_series_args(series, "reconstruct", "ae", out), capsys)
    recon = pd.read_csv(out, parse_dates=["ts"])
    source = series["frame"]
    assert list(recon.columns) == ["machine", "ts", *FEATURES]
    # window 8, stride 2: every one of the 1000 readings per machine lies in some window
    assert summary["rows"] == len(recon) == len(source)
    pd.testing.assert_frame_equal(recon[["machine", "ts"]], source[["machine", "ts"]])
    error = ((recon[FEATURES] - source[FEATURES]) ** 2).mean()
    assert (error < 0.2 * source[FEATURES].var()).all(), error


def test_vae_samples_of_windows_as_a_table_and_an_array(series, tmp_path, capsys):
    args = ["sample", "--model", str(series["vae"].artifact_dir), "--n", "3"]
    _run([*args, "--out", str(tmp_path / "s.csv")], capsys)
    _run([*args, "--out", str(tmp_path / "s.npy")], capsys)
    table = pd.read_csv(tmp_path / "s.csv")
    assert list(table.columns) == ["sample", "step", *FEATURES] and len(table) == 3 * 8
    assert table["step"].tolist()[:8] == list(range(8))
    windows = np.load(tmp_path / "s.npy")
    assert windows.shape == (3, 8, 6)
    np.testing.assert_allclose(windows.reshape(-1, 6), table[FEATURES].to_numpy(), rtol=1e-5)
    assert abs(windows.mean() - series["frame"][FEATURES].to_numpy().mean()) < 40


def test_overlap_average_means_every_covering_window():
    windows = np.arange(3 * 4 * 1, dtype=np.float32).reshape(3, 4, 1)  # W=4, stride 3
    starts = np.array([0, 3, 6])
    values, covered = overlap_average(windows, starts, n_readings=11)
    # reading 3 is in windows 0 (last step) and 1 (first step); readings 10 lies in none
    assert covered.tolist() == [True] * 10 + [False]
    assert values[3, 0] == (windows[0, 3, 0] + windows[1, 0, 0]) / 2
    assert values[4, 0] == windows[1, 1, 0]
    assert len(values) == 10


def test_a_folder_is_written_beside_its_place_and_renamed_in_or_left_as_it_was(tmp_path):
    from training.outputs import atomic_write

    def fill(folder, fail=False):
        (folder / "00000.png").write_bytes(b"one")
        if fail:
            raise OSError("disk full")

    out = tmp_path / "pictures"
    out.mkdir()  # empty: replaced
    assert atomic_write(out, fill, folder=True) == out
    assert [p.name for p in out.iterdir()] == ["00000.png"]
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        atomic_write(fresh, lambda f: fill(f, fail=True), folder=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pictures"]  # nothing half written
    with pytest.raises(OSError):
        atomic_write(out, fill, folder=True)  # holds files: refused by the rename, kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pictures"]
