"""The stages, one verb per file: the pure core and its ``run_<verb>`` (read inputs, call the
core, write outputs). The CLI (so dvc.yaml) and the Kubeflow components call ``run_<verb>``."""


class StageFailed(Exception):
    """A stage refused its input: message for the user, no traceback."""
