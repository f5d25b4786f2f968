"""Where detectors come from: the MLflow registry (read side), the alias follower, the pyfunc."""
