"""Command line of the weight converter (`python convert_weights.py` / `perft-convert`).

Import:  --hf-dir DIR|REPO_ID [--revision REV] --out DIR [--dtype bfloat16|float32] [--verify] [--overwrite]
         [--allow-pickle] [--allow-nonfinite]
         (a hub repo id resolves through the local hub cache, else downloads: perft_jax/hub.py)
Export:  --export --ckpt DIR --out DIR [--tokenizer DIR|REPO_ID]   (a perft-jax base checkpoint back to an HF
         directory, with the tokenizer files and generation config the converter kept in the checkpoint)

Bad input ends with a one-line `error: ...` naming the file, key or tensor, and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

from perft_jax.api import load_model
from perft_jax.convert.hf_to_jax import convert_hf_to_jax
from perft_jax.convert.jax_to_hf import export_hf
from perft_jax.convert.verify import compare_with_hf
from perft_jax.errors import UserError, run_cli
from perft_jax.hub import locate, model_patterns, tokenizer_files


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_weights.py", description=__doc__.split("\n")[0])
    p.add_argument("--hf-dir", help="HF model directory (config.json + safetensors), or a hub repo id "
                                    "(e.g. allenai/OLMoE-1B-7B-0924; HF_HUB_OFFLINE=1: the local cache only)")
    p.add_argument("--revision", help="with a hub repo id: the branch, tag or commit (default: main)")
    p.add_argument("--out", type=pathlib.Path, required=True, help="output directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype to store (default: the HF config's dtype)")
    p.add_argument("--verify", action="store_true",
                   help="compare logits with the HF PyTorch model after converting (needs torch)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle-based pytorch_model*.bin weights (only for files you trust)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert tensors holding NaN / inf as they are (counted and reported) instead of refusing")
    p.add_argument("--export", action="store_true", help="export a perft-jax checkpoint (--ckpt) to HF")
    p.add_argument("--ckpt", type=pathlib.Path, help="with --export: the perft-jax base checkpoint")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="with --export: safetensors shard size")
    p.add_argument("--tokenizer", help="with --export: ship this directory's (or hub repo's) tokenizer files and "
                                       "generation config; default: those the converter copied into --ckpt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> None:
    if args.export:
        if args.ckpt is None:
            raise UserError("--export needs --ckpt DIR (a perft-jax base checkpoint)")
        tokenizer = args.tokenizer or (args.ckpt if tokenizer_files(args.ckpt) else None)
        model = load_model(args.ckpt, dtype=args.dtype)
        export_hf(model, args.out, max_shard_bytes=int(args.max_shard_gb * 1024**3), overwrite=args.overwrite,
                  tokenizer=tokenizer)
        print(f"exported {args.ckpt} -> {args.out}")
        if tokenizer is None:
            print(f"note: {args.ckpt} holds no tokenizer files, so the export has none (AutoTokenizer cannot load "
                  "it); pass --tokenizer DIR to ship one", file=sys.stderr)
        return
    if args.hf_dir is None:
        raise UserError("--hf-dir DIR|REPO_ID is required (or --export --ckpt DIR)")
    if args.verify and importlib.util.find_spec("torch") is None:  # fail before converting, not after
        raise UserError("--verify needs torch (pip install 'perft-jax[hf]')")
    cfg = convert_hf_to_jax(args.hf_dir, args.out, dtype=args.dtype, allow_pickle=args.allow_pickle,
                            overwrite=args.overwrite, show_progress=not args.no_progress, revision=args.revision,
                            allow_nonfinite=args.allow_nonfinite)
    print(f"converted {cfg.model_type} ({cfg.num_layers} layers, {cfg.num_experts} experts, "
          f"{cfg.param_dtype}) {args.hf_dir} -> {args.out}")
    if args.verify:
        hf_dir = locate(args.hf_dir, revision=args.revision, allow_patterns=model_patterns(args.allow_pickle)).path
        result = compare_with_hf(hf_dir, args.out)
        print(f"verify: max |logit diff| {result['max_abs_diff']:.3e}, relative L2 {result['rel_l2']:.3e} "
              f"over {result['tokens']} tokens")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
