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
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from pipeline.batch import score_images, score_readings
from pipeline.detector import load_detector


class DetectorModel(PythonModel):
    def load_context(self, context) -> None:
        self.detector = load_detector(context.artifacts["detector"], require_calibrated=True)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        detector = self.detector
        if detector.input.kind == "image":
            shape = detector.input.image_shape
            images = np.stack(
                [np.asarray(v, dtype=np.float32).reshape(shape) for v in model_input["image"]]
            )
            return score_images(detector, images)[["score", "threshold", "p_value", "is_anomaly"]]
        return score_readings(detector, model_input)


mlflow.models.set_model(DetectorModel())
