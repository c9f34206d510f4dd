"""Monitoring: the reference profile of a registered version, the same profile of a new batch, and the drift tests
that compare them (pure: arrays and dicts in and out; MLflow stays in registry/)."""
