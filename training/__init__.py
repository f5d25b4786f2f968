"""aewatch training job: data, fitting, calibration and the MLflow registry."""
