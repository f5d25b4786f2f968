"""A real `mlflow server` over HTTP: register a version, alias it, resolve the alias elsewhere."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.mlflow_server


def test_register_alias_and_resolve_from_another_client(mlflow_server: str, tmp_path: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment = client.create_experiment(f"e-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment)
    payload = tmp_path / "weights.txt"
    payload.write_text("not a real model, but a real artifact")
    client.log_artifact(run.info.run_id, str(payload), artifact_path="detector")
    client.set_terminated(run.info.run_id)

    name = f"m-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/detector", run_id=run.info.run_id
    )
    client.set_registered_model_alias(name, "champion", version.version)

    # A separate process resolves the alias over HTTP and downloads what it points to.
    script = (
        "import sys, mlflow\n"
        "from mlflow import MlflowClient\n"
        "c = MlflowClient(tracking_uri=sys.argv[1], registry_uri=sys.argv[1])\n"
        "v = c.get_model_version_by_alias(sys.argv[2], 'champion')\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "p = mlflow.artifacts.download_artifacts(f'models:/{sys.argv[2]}@champion', dst_path=sys.argv[3])\n"
        "print(v.version, open(p + '/weights.txt').read())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, mlflow_server, name, str(tmp_path / "dl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"{version.version} not a real model, but a real artifact"
