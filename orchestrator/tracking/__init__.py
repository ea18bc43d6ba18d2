"""Experiment tracking: every MLflow call of the project is in `mlflow_runs`."""
