"""Training regimes beyond plain fine-tuning: frozen layers, FGM adversarial training (class-weighted loss: the
task's loss_weights, finetune.tasks).

Each is switched on in params.yaml ``train:`` and costs nothing when off.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch

from finetune.common.coercion import ConfigError

_LAYER = re.compile(r"\.layers?\.(\d+)\.")  # encoder block index in a parameter name (BERT, RoBERTa, DistilBERT...)


def freeze(model, spec: str) -> None:
    """``encoder``: everything but the classification head keeps the base model's weights. ``N``: the embeddings
    and the bottom N encoder layers do (with LoRA, their adapters too). Frozen weights get no gradient and are
    left out of the optimizer, so they are exported byte for byte as loaded."""
    if spec == "none":
        return
    if spec == "encoder":  # never with LoRA (config refuses it): model.base_model is then the plain encoder
        for p in model.base_model.parameters():
            p.requires_grad_(False)
        return
    n = int(spec)
    named = list(model.named_parameters())
    layers = {int(m.group(1)) for name, _ in named if (m := _LAYER.search(name))}
    if not layers or n > max(layers) + 1:
        raise ConfigError(f"train.freeze = {spec!r}: must be <= {len(layers)}, the encoder layers found in model "
                          f"type {getattr(model.config, 'model_type', '?')!r} (or none, encoder)")
    for name, p in named:
        m = _LAYER.search(name)
        if "embeddings" in name or (m and int(m.group(1)) < n):
            p.requires_grad_(False)


class FGM:
    """Fast Gradient Method (Miyato et al., 2017) on the word embedding matrix: after the clean backward, move the
    embeddings by ``epsilon * grad / ||grad||``; the caller runs a second forward/backward inside
    :meth:`perturbed`, whose gradients add to the clean ones; the exact embeddings are then put back."""

    def __init__(self, model, epsilon: float):
        self.weight = model.get_input_embeddings().weight
        self.epsilon = epsilon

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[None]:
        grad = self.weight.grad
        if grad is None:  # no clean backward reached the embeddings: nothing to follow
            yield
            return
        backup = self.weight.detach().clone()
        with torch.no_grad():  # no host sync: a zero gradient gives a zero step
            self.weight.add_(grad * (self.epsilon / grad.norm().clamp_min(1e-12)))
        try:
            yield
        finally:
            with torch.no_grad():
                self.weight.copy_(backup)
