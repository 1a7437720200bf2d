"""How the train step's cost grows (issue 6 item 3), on the bench-small model with random weights.

- Adapter experts: M = 4, 16, 64 at fixed top-2, float32, grouped backend (the fastest exact one on CPU).
  Only K=2 adapters are useful per token, so ideally the step time does not grow with M (issue 6 target: at
  most 1.2x from M=4 to 64).
- Sequence length: T = 128, 256, 512 at fixed batch 8 (so tokens per step double with T too), float32, for
  every MoE backend. Linear cost would double the step time per doubling; attention scores add a T^2 term, and a
  dispatch whose cost is super-linear in tokens shows up as growth per token.

Each group is timed side by side (interleaved rounds, median), via the library's `train_step`. Always the
bench-small shapes, whatever the suite (the GPU suite's model would not fit nine times).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

from benchmarks.common import markdown_table, time_interleaved
from benchmarks.train_step import BACKENDS, BENCHES, PERFT, JaxSide, jax_model, model_config, token_batch

ADAPTER_COUNTS = (4, 16, 64)
SEQ_LENS = (128, 256, 512)


def _log(msg: str) -> None:
    print(f"[scaling] {msg}", file=sys.stderr, flush=True)


def run(args) -> dict[str, Any]:
    bench = BENCHES["bench-small"]
    cf = args.capacity_factor or 2.0
    result: dict[str, Any] = {"config": "bench-small", "capacity_factor": cf}

    _log(f"adapter experts M in {ADAPTER_COUNTS}, top-{PERFT.top_k}, float32 grouped")
    cfg = model_config(bench, moe_backend="grouped")
    batch = token_batch(bench, cfg.vocab_size)
    sides = {}
    for m in ADAPTER_COUNTS:
        perft = dataclasses.replace(PERFT, num_adapters=m)
        sides[m] = JaxSide(jax_model(cfg, perft), batch, perft)
    timings = time_interleaved({f"M={m}": s.step for m, s in sides.items()}, args.repeats, args.warmup)
    del sides
    base = timings[f"M={ADAPTER_COUNTS[0]}"].median_s
    result["adapters"] = [{"M": m, "step_ms": timings[f"M={m}"].median_s * 1e3,
                           "best_ms": min(timings[f"M={m}"].times_s) * 1e3,
                           "growth": timings[f"M={m}"].median_s / base} for m in ADAPTER_COUNTS]

    _log(f"sequence length T in {SEQ_LENS} (batch {bench.batch}) x backends {BACKENDS}, float32")
    sides = {}
    for backend in BACKENDS:
        cfg = model_config(bench, moe_backend=backend, capacity_factor=cf)
        model = None
        for t in SEQ_LENS:
            model = model or jax_model(cfg, PERFT)  # one model per backend: shapes change, weights need not
            sides[(backend, t)] = JaxSide(model, token_batch(dataclasses.replace(bench, seq=t), cfg.vocab_size))
    timings = time_interleaved({f"{b} T={t}": s.step for (b, t), s in sides.items()}, args.repeats, args.warmup)
    rows = []
    for backend in BACKENDS:
        base = timings[f"{backend} T={SEQ_LENS[0]}"].median_s
        for t in SEQ_LENS:
            median = timings[f"{backend} T={t}"].median_s
            rows.append({"backend": backend, "T": t, "step_ms": median * 1e3,
                         "best_ms": min(timings[f"{backend} T={t}"].times_s) * 1e3, "growth": median / base,
                         "per_token_growth": median / base * SEQ_LENS[0] / t,
                         "tokens_per_s": bench.batch * t / median})
    result["seq"] = rows
    result["tables"] = {
        "Scaling: adapter experts M (top-2, float32, grouped backend)": markdown_table(
            result["adapters"], [("M", "M", "d"), ("step_ms", "step ms (median)", ".0f"), ("best_ms", "best ms", ".0f"),
                                ("growth", "x vs M=4", ".2f")]),
        f"Scaling: sequence length (batch {bench.batch} fixed, so tokens double too; float32)": markdown_table(
            rows, [("backend", "backend", "s"), ("T", "T", "d"), ("step_ms", "step ms (median)", ".0f"),
                   ("best_ms", "best ms", ".0f"),
                   ("growth", "x vs T=128", ".2f"), ("per_token_growth", "per-token x vs T=128", ".2f"),
                   ("tokens_per_s", "tokens/s", ".0f")]),
    }
    return result
