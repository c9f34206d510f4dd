"""Packed (unpadded) batches: sequences concatenated into one stream of a fixed token count.

Every packed micro-batch has the same shapes (``pack_tokens`` tokens, ``slots`` sequence slots, ``bounds`` cut
points), so torch.compile builds one graph and CUDA picks kernels once. Attention stays inside each sequence:
variable-length flash attention on CUDA (``torch.nn.attention.varlen``), a block-diagonal SDPA mask elsewhere.
An encoder's classifier reads each sequence's first token; a decoder's (training/decoder.py) reads its last, with
causal attention inside each sequence (``is_causal`` of the attention module). Empty slots carry label -100 and
add nothing to the loss.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from finetune.common.tokens import TokenizedSplit
from finetune.training.decoder import is_decoder

log = logging.getLogger(__name__)


ATTN_NAME = "finetune_packed"  # registered attention function: packed when given cut points, else plain SDPA


PACKABLE = ("bert",)  # model_type values whose encoder/head layout this module knows (BERT, MiniLM)


IGNORE = -100


@dataclass(frozen=True)
class PackShape:
    tokens: int  # stream length of every micro-batch
    slots: int  # most real sequences per micro-batch
    max_len: int  # longest segment (real or padding) in the stream: the attention kernel's tile bound

    @property
    def bounds(self) -> int:  # cut points: 0, one per real slot, then padding segments of <= max_len up to tokens
        return self.slots + math.ceil(self.tokens / self.max_len) + 1


def pack_shape(split: TokenizedSplit, pack_tokens: int) -> PackShape:
    """Shapes fixed by the data: slots = twice the expected sequences per pack (a random sample rarely needs more;
    a pack that fills its slots just closes early)."""
    lens = split.lengths
    max_len = int(lens.max())
    if max_len > pack_tokens:
        raise ValueError(f"train.pack_tokens={pack_tokens} is smaller than the longest sequence ({max_len} tokens)")
    slots = min(pack_tokens, 2 * math.ceil(pack_tokens / max(1.0, float(lens.mean()))) + 1)
    return PackShape(tokens=pack_tokens, slots=slots, max_len=max_len)


def plan_packs(lengths: np.ndarray, order: np.ndarray, shape: PackShape) -> list[np.ndarray]:
    """Greedy packing in ``order``: a pack closes when the next sequence would overflow its tokens or slots."""
    packs, cur, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if cur and (used + n > shape.tokens or len(cur) == shape.slots):
            packs.append(np.asarray(cur, dtype=np.int64))
            cur, used = [], 0
        cur.append(int(i))
        used += n
    if cur:
        packs.append(np.asarray(cur, dtype=np.int64))
    return packs


def epoch_packs(split: TokenizedSplit, shape: PackShape, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's packs, in the same shuffled order ``modeling.epoch_batches`` starts from."""
    order = np.random.default_rng([seed, epoch]).permutation(len(split))
    return plan_packs(split.lengths, order, shape)


def build_pack(split: TokenizedSplit, idx: np.ndarray, shape: PackShape, pad_id: int) -> dict[str, np.ndarray]:
    """Arrays of one packed micro-batch; ``idx`` may be empty (a filler pack so every rank runs the same steps)."""
    ids = np.full(shape.tokens, pad_id, dtype=np.int64)
    pos = np.zeros(shape.tokens, dtype=np.int64)
    starts = np.zeros(shape.slots, dtype=np.int64)
    labels = np.full(shape.slots, IGNORE, dtype=np.int64)
    cuts = [0]
    at = 0
    for s, i in enumerate(idx):
        seq = split.sequence(int(i))
        ids[at:at + len(seq)] = seq
        pos[at:at + len(seq)] = np.arange(len(seq))
        starts[s], labels[s] = at, split.labels[i]
        at += len(seq)
        cuts.append(at)
    cuts += [at] * (shape.slots - len(idx))  # empty slots: zero-length segments
    while at < shape.tokens:  # the padding tail attends only to itself, in segments no longer than max_len
        seg = min(shape.max_len, shape.tokens - at)
        pos[at:at + seg] = np.arange(seg)
        at += seg
        cuts.append(at)
    cuts += [shape.tokens] * (shape.bounds - len(cuts))
    return {"input_ids": ids[None], "position_ids": pos[None], "cu_seqlens": np.asarray(cuts, dtype=np.int32),
            "starts": starts, "labels": labels}


def to_tensors(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(v) for k, v in arrays.items()}
    if device.type == "cuda":
        out = {k: v.pin_memory() for k, v in out.items()}
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch without variable-length attention
        return None
    return varlen_attn


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface: (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # an ordinary padded call (validation, predict): plain SDPA with the usual mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    varlen = _varlen()
    causal = bool(getattr(module, "is_causal", False))  # decoders: each token sees its own sequence's past only
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: fewer key/value heads (Llama, Qwen, Mistral)
    if query.is_cuda and varlen is not None and query.dtype in (torch.float16, torch.bfloat16):
        # flash kernel over the cut points; it has no dropout on the attention probabilities (hidden dropout stays)
        max_len = kwargs["max_length_q"]
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, dim)
        out = varlen(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0) if causal else (-1, -1),
                     enable_gqa=gqa)
        return out.unsqueeze(0), None
    tokens = query.shape[2]
    at = torch.arange(tokens, device=cu.device, dtype=cu.dtype)
    doc = torch.searchsorted(cu[1:], at, right=True)
    mask = doc[:, None] == doc[None, :]  # block-diagonal: each token sees its own sequence
    if causal:
        mask = mask & (at[None, :] <= at[:, None])
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask[None, None],
                                                           scale=scaling, enable_gqa=gqa,
                                                           dropout_p=dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:

    AttentionInterface.register(ATTN_NAME, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)  # padded calls get SDPA's usual mask


def inner_model(model):
    """The transformers classifier under a peft wrapper (LoRA layers are patched in place, so calling it trains
    the adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def can_pack(model) -> bool:
    config = inner_model(model).config
    return getattr(config, "model_type", None) in PACKABLE or is_decoder(config)


class PackedClassifier(torch.nn.Module):
    """Logits of each slot of a packed micro-batch. Wrap this (not the inner model) in DDP/compile so the packed
    forward is what they see."""

    def __init__(self, model, shape: PackShape):
        super().__init__()
        if not can_pack(model):
            raise ValueError(f"packing supports model types {PACKABLE} and decoders, not "
                             f"{inner_model(model).config.model_type}")
        self.model, self.shape = model, shape
        self.decoder = is_decoder(inner_model(model).config)
        register_attention()
        inner_model(model).set_attn_implementation(ATTN_NAME)

    def forward(self, input_ids, position_ids, cu_seqlens, starts):
        clf = inner_model(self.model)
        enc = getattr(clf, clf.base_model_prefix)
        n = self.shape.max_len
        hidden = enc(input_ids=input_ids, position_ids=position_ids, cu_seq_lens_q=cu_seqlens,
                     cu_seq_lens_k=cu_seqlens, max_length_q=n, max_length_k=n).last_hidden_state
        if self.decoder:  # the head on each sequence's last token: the cut point after it, minus one
            ends = (cu_seqlens[1:self.shape.slots + 1] - 1).clamp_min(0).long()  # empty slots: label -100
            return clf.score(hidden[0, ends])
        first = hidden[0, starts].unsqueeze(1)  # (slots, 1, hidden): the pooler reads position 0
        pooled = enc.pooler(first) if enc.pooler is not None else first[:, 0]
        return clf.classifier(clf.dropout(pooled))

    def release(self, attn_implementation: str) -> None:
        """Back to the configured attention before export: the saved model must not name this module's function."""
        inner_model(self.model).set_attn_implementation(attn_implementation)
