"""The MLflow pyfunc for a registered aewatch detector ("models from code": nothing pickled).

MLflow runs this file to build the model; `load_context` reads the detector artifact attached as
`artifacts["detector"]` with the same verified, weights-only loader as the worker. Input rows:

- series detectors: one reading per row with the feature columns, plus optional `key` and `ts`;
  each row gets the score of the window ending at it (null where no window ends);
- image detectors: a column `image` holding each image as nested or flat lists of pixels.

Output per row: score, threshold, p_value, is_anomaly.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from pipeline.detector import load_detector
from pipeline.modalities import modality_of


class DetectorModel(PythonModel):
    def load_context(self, context) -> None:
        self.detector = load_detector(context.artifacts["detector"], require_calibrated=True)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return modality_of(self.detector.input).score_rows(self.detector, model_input)


mlflow.models.set_model(DetectorModel())
