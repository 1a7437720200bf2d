#!/usr/bin/env python
"""Fine-tune (or evaluate) PERFT adapters on a frozen MoE base; the same command as `perft-train`.

    python train.py                                   # the embedded demo, end to end (see perft_jax/demo.py)
    python train.py --config configs/train/olmoe-1b-7b-perft-r.yaml [key=value ...]
    python train.py --config FILE mode=eval eval.adapters=runs/x/best_adapters
    python train.py --help                            # every config key, with its type, default and doc

Re-running the same command resumes from the run's newest checkpoint.
"""
import sys

from perft_jax.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(prog="train.py"))
