"""The qv_lora baseline in PyTorch, delegated to HF PEFT (LoRA on attention q_proj / v_proj).

perft_jax writes qv_lora directories in PEFT's own format, so PEFT is the runtime here: `attach` injects its LoRA
layers into the transformers model in place (`peft.inject_adapter_in_model`), `load` sets their weights from the
directory's tensors (`peft.set_peft_model_state_dict`, which maps PEFT's saved names). PEFT computes the LoRA
branch in the adapter weights' dtype. PEFT is needed only for this variant, so it is imported when used
(`pip install peft`), and the rest of the runtime needs torch alone.
"""
from __future__ import annotations

import numpy as np
import torch

from perft_jax.errors import UserError
from perft_jax.perft.adapter_names import Entry
from perft_jax.perft.config import PerftConfig


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("qv_lora adapters run through HF PEFT, which is not installed: pip install peft") from None
    return peft


def attach(hf_model: torch.nn.Module, cfg: PerftConfig) -> None:
    """Inject PEFT LoRA layers (r, alpha, dropout of `cfg`) on every q_proj and v_proj, in place."""
    peft = _peft()
    config = peft.LoraConfig(r=cfg.bottleneck, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout,
                             target_modules=["q_proj", "v_proj"], bias="none", task_type="CAUSAL_LM")
    peft.inject_adapter_in_model(config, hf_model)
    for layer in hf_model.model.layers:  # PEFT's new layers start in train mode: give them their parent's
        layer.self_attn.train(layer.self_attn.training)


def load(hf_model: torch.nn.Module, tensors: list[tuple[Entry, np.ndarray]], where: str) -> None:
    """Set the injected LoRA weights from the (already checked) file tensors, under PEFT's saved names."""
    state = {e.name: torch.from_numpy(np.ascontiguousarray(value)) for e, value in tensors}
    result = _peft().set_peft_model_state_dict(hf_model, state)
    if result.unexpected_keys:
        raise UserError(f"{where}: tensor {result.unexpected_keys[0]} has no LoRA layer in the model")
