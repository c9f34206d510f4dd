"""The Kubeflow pipeline: the DAG (finetune_pipeline.py), its compiled spec, and submission."""
