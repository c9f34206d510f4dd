"""The training library: batches, packing, model + optimizer, step plan, distributed, checkpoints, early stopping,
regimes, and the steps a run is made of (recipe.py: setup, resume, export; loop.py: the loop). stages/train.py
composes them."""
