#!/usr/bin/env python
"""Convert Hugging Face OLMoE / Mixtral weights to a perft-jax checkpoint (and back with --export).

    python convert_weights.py --hf-dir path/to/hf --out ckpts/model [--dtype bfloat16] [--verify]
"""
import sys

from perft_jax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
