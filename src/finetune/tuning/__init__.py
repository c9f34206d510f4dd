"""Hyperparameter search: Optuna study, trial runner, its MLflow logging."""
