"""Distributed data-parallel training: two gloo ranks on the CPU against one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.detector import load_detector
from pipeline.errors import ConfigError, DistributedError
from pipeline.tools.synthetic import write_parquet_series
from tests.helpers import write_series_csv
from training.cli.train import build_train_parser, launch_settings_from_args, settings_from_args
from training.distributed import LaunchSettings, RankContext, launch
from training.job import prepare, train


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--time-col", "ts", "--key-col", "machine", "--window", "8",
        "--stride", "2", "--hidden", "32", "--code-size", "8", "--epochs", "4", "--min-steps", "0",
        "--patience", "0",
        "--batch-size", "64", "--target-fpr", "0.05", "--device", "cpu", "--seed", "3",
        "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def test_two_gloo_ranks_train_what_one_process_trains(tmp_path: Path, capsys, mlflow_embedded):
    from mlflow import MlflowClient

    data = write_series_csv(tmp_path / "series.csv", n_keys=2, n=700)
    single_args = _args(data, tmp_path / "single")
    settings = settings_from_args(build_train_parser().parse_args(single_args))
    windows = len(prepare(settings).splits["train"])
    assert windows % 64 != 1, "a last batch of one window would be left out by two ranks"
    torch.set_num_threads(1)
    single = train(settings)

    distributed = [*_args(data, tmp_path / "ddp"), "--nproc-per-node", "2", "--register", "pumps"]
    assert main(["train", *distributed, "--tracking-uri", mlflow_embedded, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert summary["epochs"] == 4 and summary["registered_version"] == "1"
    assert summary["windows_per_second"] > 0
    ddp = load_detector(summary["artifact"])
    assert ddp.info["fit"]["world_size"] == 2
    worst = max(
        float((a - b).abs().max())
        for a, b in zip(
            single.detector.model.state_dict().values(),
            ddp.model.state_dict().values(),
            strict=True,
        )
    )
    print(f"largest parameter difference, two ranks vs one process: {worst:.2e}")
    assert worst < 1e-4, f"parameters differ by up to {worst:.2e}"
    assert ddp.info["fit"]["train_losses"] == pytest.approx(single.fit.train_losses, rel=1e-4)
    assert ddp.info["fit"]["val_losses"] == pytest.approx(single.fit.val_losses, rel=1e-4)

    client = MlflowClient(mlflow_embedded)
    experiment = client.get_experiment_by_name("aewatch")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].data.params["world_size"] == "2"
    assert [str(v.version) for v in client.search_model_versions("name='pumps'")] == ["1"]


def _fail_on_rank_one() -> str:
    """Rank 1 raises while rank 0 waits for it in a collective."""
    context = RankContext.from_environment(__import__("os").environ)
    context.join("gloo", torch.device("cpu"))
    if context.rank == 1:
        raise ValueError("sensor table m7 is corrupt")
    torch.distributed.barrier()
    return "rank 0 finished"


def test_a_rank_that_raises_fails_the_job_with_its_message():
    with pytest.raises(DistributedError, match="rank 1 failed: ValueError: sensor table m7") as err:
        launch(LaunchSettings(nproc_per_node=2), _fail_on_rank_one)
    assert err.value.rank == 1


def test_the_train_command_exits_non_zero_with_the_failing_rank_error(tmp_path: Path, capsys):
    root = write_parquet_series(tmp_path / "ds", n_keys=1, n=300, days=2)
    late = root / "date=2026-01-02" / "m0.parquet"
    late.rename(root / "date=2026-01-01" / "a.parquet")  # later readings now sort first
    args = _args(root, tmp_path / "det", "--out-of-core", "--nproc-per-node", "2")
    assert main(["train", *args, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    message = capsys.readouterr().err
    assert "aewatch train: error: rank" in message and "time order" in message


def test_launch_settings_are_checked_at_start(monkeypatch):
    parse = build_train_parser().parse_args
    with pytest.raises(ConfigError, match="^rdzv_endpoint: "):
        launch_settings_from_args(parse(["--data", "x", "--nnodes", "2"]))
    with pytest.raises(ConfigError, match="^nproc_per_node: "):
        launch_settings_from_args(parse(["--data", "x", "--nproc-per-node", "0"]))
    assert main(["train", "--data", "x.csv", "--time-col", "ts", "--kind", "pca",
                 "--nproc-per-node", "2"]) == 2  # fmt: skip
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="^distributed: .*LOCAL_RANK"):
        RankContext.from_environment(__import__("os").environ)


@pytest.mark.parametrize(("local_world_size", "share"), [(1, 3), (2, 1), (4, 1)])
def test_training_on_the_cpu_takes_its_share_of_the_cores_a_container_may_use(
    tmp_path: Path, monkeypatch, local_world_size, share
):
    """Under a CPU limit of 3 cores on a 64-core node (a cgroup quota, not fewer visible cores)
    each of N ranks on a node takes its share of 3 and a one-process job at most 3 threads; the
    ranks divided `os.cpu_count()` and a one-process job kept torch's default (every core)."""
    import training.distributed as distributed
    from pipeline.detector.cores import available_cores

    (tmp_path / "cpu.max").write_text("300000 100000\n")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr(distributed, "available_cores", lambda: available_cores(tmp_path))
    context = RankContext(world_size=local_world_size, local_world_size=local_world_size)
    assert context.cpu_threads() == share
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)  # torch's default on a node of 8 physical cores
        assert RankContext().device("cpu").type == "cpu"
        assert torch.get_num_threads() == 3
        torch.set_num_threads(2)  # fewer than the limit: kept
        RankContext().device("cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
