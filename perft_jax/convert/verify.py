"""`--verify`: run the HF PyTorch model and the converted JAX model on the same tokens, compare logits."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from perft_jax.api import load_model
from perft_jax.errors import UserError


def compare_with_hf(hf_dir: pathlib.Path, ckpt_dir: pathlib.Path, seq_len: int = 16, seed: int = 0) -> dict:
    """Max |logit difference| and relative L2 error, both models run in float32 on random token ids."""
    try:
        import torch
        import transformers
    except ImportError:
        raise UserError("--verify needs torch (pip install 'perft-jax[hf]')") from None
    model = load_model(ckpt_dir, dtype="float32")
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, size=(2, seq_len))
    with jax.default_matmul_precision("float32"):
        ours = np.asarray(model(jnp.asarray(ids)).logits, np.float64)
    del model
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf_model.eval()
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(ids)).logits.double().numpy()
    diff = ours - ref
    return {"max_abs_diff": float(np.abs(diff).max()),
            "rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(ref)), "tokens": int(ids.size)}
