"""A registered image detector's pyfunc accepts what its docstring says: a column `image` of flat
or nested (H x W) pixel lists, through MLflow's own schema enforcement (`pyfunc.load_model` then
`predict`, the path `mlflow models serve` takes for each request)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from pipeline.detector import ModelConfig
from tests.helpers import register_result
from training.fit import FitConfig
from training.job import CalibrationSettings, TrainSettings, train
from training.tracking import local_store


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("pyfunc-images")
    result = train(
        TrainSettings(
            data="digits",
            normal_class="0",
            out=str(root / "det"),
            model=ModelConfig(kind="undercomplete", hidden=(16,), code_size=4),
            fit=FitConfig(epochs=2, batch_size=64),
            calibration=CalibrationSettings(method="mad"),
            device="cpu",
        )
    )
    uri = local_store(root, "tests")
    version = register_result(uri, result, "digits")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return mlflow.pyfunc.load_model(f"models:/digits/{version}"), result
    finally:  # later tests' MLflow calls and the servers they start must not find this store
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)  # set_registry_uri exports it


def test_nested_and_flat_image_rows_score_the_same(served):
    model, result = served
    images = result.data.splits["test"].images[:3, 0].astype(np.float64)  # [3, 8, 8]
    nested = model.predict(pd.DataFrame({"image": [image.tolist() for image in images]}))
    flat = model.predict(pd.DataFrame({"image": [image.ravel().tolist() for image in images]}))
    expected = result.detector.score(images[:, None].astype(np.float32)).scores
    np.testing.assert_allclose(nested["score"].to_numpy(float), expected, rtol=1e-5)
    np.testing.assert_allclose(flat["score"].to_numpy(float), expected, rtol=1e-5)
