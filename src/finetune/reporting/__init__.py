"""The run report, the model card and the plots."""
