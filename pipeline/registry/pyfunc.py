"""The MLflow pyfunc for a registered aewatch detector ("models from code": nothing pickled).

MLflow runs this file to build the model; `load_context` reads the detector artifact attached as
`artifacts["detector"]` with the same verified, weights-only loader as the worker, and checks the
whole artifact's digest that registration put in the model config. Input rows:

- series detectors: one reading per row with the feature columns, plus optional `key` and `ts`;
  each row gets the score of the window ending at it (null where no window ends);
- image detectors: a column `image` holding each image as nested lists of pixels ([C, H, W],
  [H, W, C] or [H, W], as the worker reads an array) or flat ones in [C, H, W] order.

Output per row: score, threshold, p_value, is_anomaly.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from pipeline.detector import load_detector
from pipeline.errors import ArtifactError
from pipeline.modalities import modality_of


class DetectorModel(PythonModel):
    def load_context(self, context) -> None:
        digest = (context.model_config or {}).get("artifact_sha256")
        if not digest:
            raise ArtifactError(
                "the MLflow model has no artifact digest in its model config; register it again",
                reason="artifact_digest",
            )
        self.detector = load_detector(
            context.artifacts["detector"], require_calibrated=True, expected_digest=digest
        )

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return modality_of(self.detector.input).score_rows(self.detector, model_input)


mlflow.models.set_model(DetectorModel())
