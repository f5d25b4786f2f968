"""A registered series detector's pyfunc takes a table as `pd.read_csv` gives it, through
MLflow's own schema enforcement (`pyfunc.load_model` then `predict`, the path `mlflow models
serve` takes): float64 or float32 readings, epoch-ms or ISO times, no key column."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from tests.helpers import labelled_series_csv, register_result, train_series_detector
from training.tracking import local_store


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("pyfunc-series")
    data = labelled_series_csv(root / "data.csv", n_keys=1, n=800)
    result = train_series_detector(data, root / "det", score="raw")
    uri = local_store(root, "tests")
    version = register_result(uri, result, "series")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return mlflow.pyfunc.load_model(f"models:/series/{version}"), result, data
    finally:  # later tests' MLflow calls and the servers they start must not find this store
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


def _rows(data, n=40) -> pd.DataFrame:
    frame = pd.read_csv(data).head(n)  # float64 readings, ISO text times
    return frame.rename(columns={"machine": "key"}).drop(columns="label")


def test_a_table_as_read_from_csv_is_scored_in_every_form_mlflow_passes(served):
    model, result, data = served
    rows = _rows(data)
    expected = model.predict(rows)["score"].to_numpy(float)
    assert np.isfinite(expected[~np.isnan(expected)]).all() and (~np.isnan(expected)).sum() > 0
    epoch = rows.assign(ts=pd.to_datetime(rows["ts"]).astype("datetime64[ms]").astype("int64"))
    for variant in (
        epoch,  # epoch milliseconds
        rows.astype({c: "float32" for c in rows.columns if c.startswith("s")}),
        rows.drop(columns="key"),  # one unnamed key
    ):
        np.testing.assert_allclose(model.predict(variant)["score"].to_numpy(float), expected)
