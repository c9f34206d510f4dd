"""Task families: what a task means for the head, loss, metrics, decision rule and predictions."""
