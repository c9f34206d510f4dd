"""Decoder LLMs (Llama, Qwen2/3, Mistral, Gemma, GPT-2 families) as sequence classifiers: what differs from an
encoder, in one place.

The model is transformers' ``<Arch>ForSequenceClassification``: a ``score`` head over every position, read at the
last real token (the rightmost token that is not the pad token, so left- and right-padded batches read the same
position). LoRA targets are chosen per architecture; the head is trained in full next to the adapters (peft's
SEQ_CLS task puts ``score`` in modules_to_save). QLoRA (4-bit base) and bf16 base weights are CUDA-only paths.
"""

from __future__ import annotations

from types import ModuleType

import torch
import transformers
from transformers import AutoConfig
from transformers.pytorch_utils import Conv1D

from finetune.common.coercion import ConfigError
from finetune.common.config import TrainConfig

# model_type -> the attention projections that ``train.lora.target_modules: [auto]`` adapts
DECODER_LORA = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"), "qwen3_moe": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"), "gemma3_text": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",), "gpt2": ("c_attn",),
}
ENCODER_LORA = {"bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
                "distilbert": ("q_lin", "v_lin"), "deberta-v2": ("query_proj", "value_proj")}
HEADS = ("score", "classifier")  # classification heads: trained in full, never adapted
DECODER_TASKS = ("single_label", "multi_label")  # a decoder reads one position: no per-token (NER) head yet


def is_decoder(mcfg) -> bool:
    """A causal LM base: a known decoder model_type, or a config whose architectures name a causal LM."""
    if getattr(mcfg, "model_type", None) in DECODER_LORA:
        return True
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(mcfg, "architectures", None) or [])


def check_decoder_task(task: str, mcfg) -> None:
    """The one refusal of token classification (NER) with a decoder base."""
    if is_decoder(mcfg) and task not in DECODER_TASKS:
        raise ConfigError(f"task = {task!r} with decoder base model type {mcfg.model_type!r}: a decoder classifier "
                          f"reads one position per text; use an encoder base (BERT family) for {task}, or a task "
                          f"of {', '.join(DECODER_TASKS)}")


def linear_module_names(model) -> set[str]:
    """Last name parts of every linear layer (GPT-2's Conv1D included) outside the classification head."""
    names = set()
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)) and not any(h in name.split(".") for h in HEADS):
            names.add(name.rsplit(".", 1)[-1])
    return names


def lora_targets(model, requested: list[str]) -> list[str]:
    """``train.lora.target_modules`` resolved for this architecture: [auto] (the attention projections of its
    family), [all-linear] (every linear layer but the head), or names that must exist in the model."""
    mtype = getattr(model.config, "model_type", "?")
    present = linear_module_names(model)
    if list(requested) == ["auto"]:
        auto = DECODER_LORA.get(mtype) or ENCODER_LORA.get(mtype)
        if auto is None or not set(auto) <= present:
            raise ConfigError(f"train.lora.target_modules = [auto]: no default for model type {mtype!r}; name its "
                              f"modules (linear layers: {', '.join(sorted(present))}) or use [all-linear]")
        return list(auto)
    if list(requested) == ["all-linear"]:
        return sorted(present)
    missing = [t for t in requested if t not in present]
    if missing:
        raise ConfigError(f"train.lora.target_modules = {list(requested)}: model type {mtype!r} has no module "
                          f"{', '.join(missing)} (its linear layers: {', '.join(sorted(present))}); use [auto] or "
                          f"[all-linear]")
    return list(requested)


def check_options(cfg: TrainConfig, mcfg, device: torch.device) -> None:
    """Settings that cannot apply to this base or device, refused before any weight is loaded."""
    dec = cfg.decoder
    if dec.load_in_4bit:
        if device.type != "cuda":
            raise ConfigError(f"train.decoder.load_in_4bit = true: QLoRA's 4-bit weights need CUDA (bitsandbytes "
                              f"kernels), this run is on {device.type}; set it false (LoRA on full-precision "
                              f"weights runs on CPU)")
        if not cfg.lora.enabled:
            raise ConfigError("train.decoder.load_in_4bit = true needs train.lora.enabled = true (4-bit weights "
                              "cannot be trained; only adapters on top of them)")
    if is_decoder(mcfg) and cfg.freeze not in ("none", "encoder"):
        raise ConfigError(f"train.freeze = {cfg.freeze!r}: freezing BERT-style 'embeddings' and the bottom encoder "
                          f"layers does not apply to decoder model type {mcfg.model_type!r}; use train.lora.enabled "
                          f"(adapters) or freeze: encoder (head only)")


def base_config(base, labels: list[str], pad_id: int | None, task: ModuleType):
    """The base's config with the label maps; a decoder's pad token id set from the tokenizer when missing (the
    head reads the last token that is not this id)."""
    mcfg = AutoConfig.from_pretrained(str(base), num_labels=len(labels), id2label=dict(enumerate(labels)),
                                      label2id={lab: i for i, lab in enumerate(labels)}, local_files_only=True,
                                      problem_type=task.PROBLEM_TYPE)
    check_decoder_task(task.NAME, mcfg)
    if is_decoder(mcfg) and getattr(mcfg, "pad_token_id", None) is None:
        if pad_id is None:
            raise ConfigError(f"decoder base {base} has no pad token id in config.json and none was given")
        mcfg.pad_token_id = pad_id
    return mcfg


def load_weights(base, mcfg, cfg: TrainConfig, device: torch.device, task: ModuleType):
    """The classifier's weights: fp32; on CUDA with LoRA bf16 (bf16_weights) or 4-bit NF4 (load_in_4bit)."""
    kw = {"config": mcfg, "local_files_only": True, "use_safetensors": True,
          "attn_implementation": cfg.attn_implementation}
    if device.type == "cuda" and cfg.decoder.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16,
                                                       llm_int8_skip_modules=list(HEADS))
        kw["device_map"] = {"": device.index or 0}
    elif device.type == "cuda" and cfg.lora.enabled and cfg.decoder.bf16_weights:
        kw["dtype"] = torch.bfloat16
    return getattr(transformers, task.AUTO_MODEL).from_pretrained(str(base), **kw)


def add_adapters(model, cfg: TrainConfig, task: ModuleType):
    """LoRA adapters on the resolved targets; the head (score/classifier) trained in full in fp32, as are the
    adapters, whatever dtype the frozen base weights have."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model, prepare_model_for_kbit_training

    targets = lora_targets(model, cfg.lora.target_modules)
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, PeftLora(task_type=task.LORA_TASK_TYPE, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                           lora_dropout=cfg.lora.dropout, target_modules=targets,
                                           fan_in_fan_out=model.config.model_type == "gpt2"))
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def enable_checkpointing(model) -> None:
    """Gradient checkpointing (non-reentrant: frozen inputs under LoRA still get gradients through it)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner.config.use_cache = False
