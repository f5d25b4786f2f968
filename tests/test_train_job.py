"""The training job end to end: images, series through the CLI, config files, MLflow runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.cli import main
from pipeline.detector import ModelConfig, load_detector
from pipeline.errors import ConfigError
from tests.helpers import write_series_csv
from training.fit import FitConfig
from training.job import CalibrationSettings, TrainSettings, train


def test_conv_autoencoder_on_digits_separates_the_normal_digit(tmp_path: Path):
    settings = TrainSettings(
        data="digits",
        normal_class="0",
        out=str(tmp_path / "det"),
        model=ModelConfig(kind="undercomplete", backbone="conv", hidden=(16, 32), code_size=8),
        fit=FitConfig(min_steps=0, epochs=60, batch_size=32, lr=3e-3, patience=10),
        calibration=CalibrationSettings(method="quantile", target_fpr=0.05),
        device="cpu",
    )
    result = train(settings)
    assert result.evaluation["auroc"] > 0.9
    assert result.detector.threshold.calibrated
    test = result.data.splits["test"]
    labels = test.labels.astype(bool)
    assert labels.any() and (~labels).any()
    scores = result.detector.score(test.images)
    assert scores.pixel_map.shape == (len(test), 8, 8)
    auroc = roc_auc_score(labels, scores.scores)
    assert auroc > 0.9, f"AUROC {auroc:.3f}"
    reloaded = load_detector(tmp_path / "det")
    np.testing.assert_array_equal(reloaded.score(test.images).scores, scores.scores)


def _train_cli(args: list[str], capsys) -> dict:
    assert main(["train", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_command_records_an_mlflow_run(tmp_path: Path, capsys, mlflow_embedded: str):
    from mlflow import MlflowClient

    data = write_series_csv(tmp_path / "series.csv", n_keys=2, n=800)
    args = (
        f"--data {data} --time-col ts --key-col machine --window 16 --stride 4 --epochs 4 "
        f"--min-steps 0 --patience 0 --kind denoising --target-fpr 0.05 --out {tmp_path / 'det'} "
        f"--tracking-uri {mlflow_embedded}"
    )
    out = _train_cli(args.split(), capsys)
    assert out["model_kind"] == "denoising"
    assert out["epochs"] == 4 and out["train_loss"] > 0 and out["val_loss"] > 0
    detector = load_detector(out["artifact"])
    assert detector.input.features == tuple(f"s{i}" for i in range(6))
    assert detector.input.window.length == 16

    client = MlflowClient(mlflow_embedded)
    run = client.get_run(out["run_id"])
    assert run.data.params["model.kind"] == "denoising"
    history = client.get_metric_history(out["run_id"], "val_loss")
    assert [m.step for m in history] == [0, 1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "detector_files")}
    assert artifacts == {"detector_files/manifest.json", "detector_files/weights.pt"}
    figures = {a.path for a in client.list_artifacts(out["run_id"], "figures")}
    assert {"figures/loss_curves.png", "figures/score_histogram.png"} <= figures
    assert run.data.metrics["threshold"] == detector.threshold.value


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_keys_mirror_flags(tmp_path: Path, capsys, mlflow_embedded, suffix):
    data = write_series_csv(tmp_path / "series.csv", n_keys=1, n=600)
    if suffix == ".toml":
        text = (
            f'data = "{data}"\ntime-col = "ts"\nkey_col = "machine"\nwindow = 12\n'
            f'hidden = [32, 16]\ncode-size = 4\nkind = "sparse"\nepochs = 2\n'
            "min-steps = 0\n"
        )
    else:
        text = (
            f"data: {data}\ntime-col: ts\nkey_col: machine\nwindow: 12\n"
            f"hidden: [32, 16]\ncode-size: 4\nkind: sparse\nepochs: 2\n"
            "min-steps: 0\n"
        )
    config = tmp_path / f"train{suffix}"
    config.write_text(text)
    # the flag on the command line wins over the file
    out = _train_cli(
        [
            "--config",
            str(config),
            "--epochs",
            "3",
            "--patience",
            "0",
            "--calibration",
            "mad",
            "--out",
            str(tmp_path / "det"),
            "--tracking-uri",
            mlflow_embedded,
        ],
        capsys,
    )
    detector = load_detector(out["artifact"])
    assert detector.config.kind == "sparse"
    assert detector.config.hidden == (32, 16) and detector.config.code_size == 4
    assert detector.input.window.length == 12
    assert out["epochs"] == 3


def test_unknown_config_key_names_it(tmp_path: Path, capsys):
    config = tmp_path / "train.toml"
    config.write_text('data = "x.csv"\ncode_sise = 4\n')
    assert main(["train", "--config", str(config)]) == 2
    assert "code_sise" in capsys.readouterr().err


def test_a_config_number_of_nan_names_its_key(tmp_path: Path, capsys):
    config = tmp_path / "train.toml"
    config.write_text('data = "x.csv"\nlr = nan\n')  # TOML has NaN; no bound would catch it
    assert main(["train", "--config", str(config)]) == 2
    assert "config: lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('overwrite = "false"', "overwrite"),  # was taken as on: an existing detector replaced
        ("overwrite = 0", "overwrite"),
        ("window = true", "window"),  # was taken as a window of 1
        ("window = 16.9", "window"),  # was taken as 16
        ("epochs = 2.7", "epochs"),  # was taken as 2
        ("window = 1e400", "window"),  # infinity: was an OverflowError traceback
        ("window = inf", "window"),
        # a table where a value belongs: AttributeError and TypeError tracebacks
        ("experiment = {x = 1}", "experiment"),
        ("time-col = {a = 1}", "time-col"),
        ('key-col = [["a"]]', "key-col"),
        ("code-size = 4\ncode_size = 16", "code_size"),  # one setting twice: the last won
    ],
)
def test_a_config_value_that_is_not_the_flags_type_names_its_key(tmp_path: Path, capsys, line, key):
    config = tmp_path / "train.toml"
    config.write_text(f'data = "x.csv"\n{line}\n')
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"config: {key}" in err, err


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("data: x.csv\nwindow: 16\nwindow: 64\n", ("line 3", "'window' is given twice")),
        ("data: x.csv\nexperiment:\n  x: 1\n", ("config: experiment", "not a table")),
    ],
)
def test_a_yaml_config_with_a_key_twice_or_a_table_for_a_value_names_it(
    tmp_path: Path, capsys, text, words
):
    config = tmp_path / "train.yaml"
    config.write_text(text)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_a_config_true_or_false_sets_an_on_off_flag_as_the_flag_would(tmp_path: Path):
    import argparse

    from pipeline.config_file import load_config_file

    parser = argparse.ArgumentParser()
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-gate", dest="gate", action="store_false")
    for text, expected in [
        ("overwrite = true\nno-gate = true\n", {"overwrite": True, "gate": False}),
        ("overwrite = false\nno-gate = false\n", {"overwrite": False, "gate": True}),
    ]:
        config = tmp_path / "c.toml"
        config.write_text(text)
        assert load_config_file(str(config), parser) == expected


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("train.yaml", b"data: [x.csv\n", "line 2"),  # a flow sequence never closed
        ("train.yml", b"data: x.csv\n  bad: indent\n", "line 2"),
        ("train.toml", b'data = "x.csv\n', "line 1"),
        ("train.toml", b"\xff\xfe data = 1\n", "UTF-8"),
        ("train.yaml", b"data: \xff\n", "UTF-8"),
    ],
)
def test_a_config_file_that_does_not_parse_is_one_line_naming_it(
    tmp_path: Path, capsys, name, content, says
):
    config = tmp_path / name
    config.write_bytes(content)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(config) in err and says in err, err


def test_bce_refuses_inputs_outside_unit_interval(tmp_path: Path):
    data = write_series_csv(tmp_path / "series.csv", n_keys=1, n=400)
    settings = TrainSettings(
        data=str(data),
        time_col="ts",
        key_col="machine",
        window=8,
        scaler="standard",
        out=str(tmp_path / "det"),
        model=ModelConfig(loss="bce", input_shape=(1, 1)),
        fit=FitConfig(min_steps=0, epochs=1),
        device="cpu",
    )
    with pytest.raises(ConfigError, match=r"bce needs inputs in \[0, 1\]"):
        train(settings)


def test_labelled_anomalies_never_reach_training(tmp_path: Path):
    frame_path = write_series_csv(tmp_path / "series.csv", n_keys=1, n=600)
    import pandas as pd

    frame = pd.read_csv(frame_path)
    frame["label"] = 0
    frame.loc[100:120, "label"] = 1
    frame.to_csv(frame_path, index=False)
    settings = TrainSettings(
        data=str(frame_path),
        time_col="ts",
        key_col="machine",
        label_col="label",
        window=8,
        out=str(tmp_path / "det"),
        model=ModelConfig(),
        fit=FitConfig(min_steps=0, epochs=1),
        calibration=CalibrationSettings(method="mad"),
        device="cpu",
    )
    result = train(settings)
    assert "label" not in result.detector.input.features
    assert not result.data.splits["train"].any_labels.any()
    assert result.data.splits["train"].any_labels is not None


@pytest.mark.parametrize("own_keys", [False, True], ids=["scaler", "key-baselines"])
def test_training_holds_the_scaled_series_and_cuts_the_windows_per_batch(own_keys):
    """The training input was a tensor of every scaled window, W times the series; now it is
    the scaled series with each window's first row, giving the same batches bit for bit."""
    import torch

    from pipeline.detector import Scaler, WindowSpec, cut_windows
    from pipeline.detector.baselines import KeyStats
    from pipeline.detector.models import ModelConfig
    from training.data.prepared import SeriesSplits

    rng = np.random.default_rng(3)
    series = {k: rng.normal(10 * i, 1 + i, size=(300, 4)) for i, k in enumerate("abc")}
    windows = cut_windows([(k, np.arange(300), v, None) for k, v in series.items()], WindowSpec(16))
    part = windows.subset(np.flatnonzero(np.arange(len(windows)) % 7 != 3))  # windows left out
    scaler = Scaler.fit("standard", np.concatenate(list(series.values())))
    stats = None
    if own_keys:
        stats = KeyStats(
            keys={k: (tuple(v.mean(0)), tuple(v.std(0)), 300) for k, v in series.items()}
        )
    splits = SeriesSplits(None, scaler, {"train": part}, {}, None, stats)
    config = ModelConfig(kind="undercomplete", input_shape=(16, 4), code_size=4)
    x_train, _ = splits.fit_inputs(
        config, batch_size=64, shuffle_windows=0, seed=0, context=None, device=torch.device("cpu")
    )
    # the windows as one tensor, scaled the way the detector scales them
    raw = np.asarray(part.windows)
    scaling = splits.scaling(None, "train")
    if scaling is None:
        expected = scaler.transform(raw, axis=2)
    else:
        assert own_keys
        center, scale = (a[:, None, :] for a in scaling)
        expected = ((raw.astype(np.float32) - center) / scale).astype(np.float32)
    assert len(x_train) == len(expected)
    index = torch.randperm(len(expected), generator=torch.Generator().manual_seed(0))[:100]
    assert torch.equal(x_train.index_select(0, index), torch.from_numpy(expected)[index])
    assert torch.equal(x_train[10:50], torch.from_numpy(expected)[10:50])
    held = x_train.rows.numel() * x_train.rows.element_size()
    assert held <= 3 * 300 * 4 * 4 < expected.nbytes / 10
