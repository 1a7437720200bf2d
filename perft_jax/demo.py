"""The embedded default job: a full HF -> perft-jax -> HF round trip on a tiny locally built OLMoE.

    python -m perft_jax.demo [--workdir DIR]

1. builds a tiny random `OlmoeForCausalLM` with transformers and saves it (safetensors, per-expert names);
2. converts it with the converter CLI (`--verify` compares logits with the PyTorch model);
3. loads the checkpoint with `perft_jax.load_model` and runs every MoE dispatch backend;
4. exports it back to an HF directory and reloads that with transformers;
and prints the logit errors of each step. Needs torch (`pip install -e '.[hf]'`); no network.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np


def _tiny_olmoe(path: pathlib.Path):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.OlmoeConfig(vocab_size=512, hidden_size=128, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                      num_experts=16, num_experts_per_tok=4, eos_token_id=2, pad_token_id=1,
                                      bos_token_id=0)
    model = transformers.OlmoeForCausalLM(config).eval()
    model.save_pretrained(str(path))
    return model


def run(workdir: pathlib.Path) -> list[tuple[str, float]]:
    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx

    from perft_jax import export_hf, load_model
    from perft_jax.convert import cli

    jax.config.update("jax_default_matmul_precision", "float32")
    hf_model = _tiny_olmoe(workdir / "hf")
    ckpt, back = workdir / "ckpt", workdir / "hf_export"
    if cli.main(["--hf-dir", str(workdir / "hf"), "--out", str(ckpt), "--verify", "--overwrite"]) != 0:
        raise SystemExit(2)

    ids = np.random.default_rng(0).integers(3, 512, size=(2, 24))
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        want = hf_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.double().numpy()
    keep = mask.astype(bool)

    def rel_err(got) -> float:
        got = np.asarray(got, np.float64)
        return float(np.linalg.norm(got[keep] - want[keep]) / np.linalg.norm(want[keep]))

    rows = []
    forward = nnx.jit(lambda model, i, a: model(i, attention_mask=a).logits)
    for backend in ("dense", "capacity", "ragged"):
        model = load_model(ckpt, moe_backend=backend, capacity_factor=4.0)
        logits = forward(model, jnp.asarray(ids), jnp.asarray(mask))
        rows.append((f"perft-jax ({backend} dispatch) vs HF PyTorch", rel_err(logits)))
    export_hf(load_model(ckpt), back, overwrite=True)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(back), dtype=torch.float32).eval()
    with torch.no_grad():
        again = reloaded(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    rows.append(("HF export reloaded by transformers vs original", rel_err(again)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=pathlib.Path, help="keep the artifacts here (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or pathlib.Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = run(workdir)
    width = max(len(name) for name, _ in rows)
    print(f"\n{'check':<{width}}  relative L2 error of logits (float32; target <= 1e-5)")
    for name, err in rows:
        print(f"{name:<{width}}  {err:.2e}  {'ok' if err <= 1e-5 else 'FAIL'}")
    return 0 if all(err <= 1e-5 for _, err in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
