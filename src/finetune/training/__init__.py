"""The training library: batches, packing, model + optimizer, step plan, distributed,
checkpoints, early stopping, regimes. stages/train.py composes it."""
