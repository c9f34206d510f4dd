"""Kubeflow Pipelines components: one per stage verb (finetune_components.py) and the image they run in."""
