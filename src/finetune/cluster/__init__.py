"""Kubernetes: the TrainJob launcher, pipeline submission, Katib objects, KServe deploy."""
