"""Forward + backward time of every MoE dispatch backend on one OLMoE-shaped layer.

    python -m benchmarks.moe_dispatch [--tokens 2048 --hidden 512 --experts 16 --top-k 4 --intermediate 256]

All backends run side by side in one process on the same inputs: warm-up (compile) once, then
`--repeats` interleaved rounds, median reported. It is also the suite's `dispatch` section
(benchmarks/run.py). Two backward modes are timed:
- `frozen`: gradients w.r.t. the layer input only, as when the base model is frozen under PERFT;
- `full`: also w.r.t. router and expert weights (full fine-tuning), for comparison.
The loss is sum(y**2); every backend's loss and input gradient are checked against `dense` first.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import device_line, environment, markdown_table, matmul_peak_gflops, time_interleaved
from benchmarks.train_step import BACKENDS
from perft_jax.models.config import ModelConfig
from perft_jax.models.moe.block import SparseMoeBlock


def _block(args, backend: str, dtype: str) -> SparseMoeBlock:
    cfg = ModelConfig(model_type="olmoe", vocab_size=8, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=2, num_experts=args.experts,
                      num_experts_per_tok=args.top_k, norm_topk_prob=False, qk_norm=False, param_dtype=dtype,
                      dtype=dtype, moe_backend=backend, capacity_factor=args.capacity_factor)
    return SparseMoeBlock(cfg, nnx.Rngs(0))


def _step(block: SparseMoeBlock, full: bool):
    graphdef, params = nnx.split(block)

    def loss(p, x):
        y, aux = nnx.merge(graphdef, p)(x)
        return jnp.sum(jnp.square(y.astype(jnp.float32))), aux.dropped

    argnums = (0, 1) if full else 1
    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))
    return lambda x: grad_fn(params, x)


def _flops(args, full: bool) -> float:
    """Useful expert FLOPs of one fwd+bwd: only the K chosen experts per token count (dense does E/K x more)."""
    forward = 2 * args.tokens * args.top_k * 3 * args.hidden * args.intermediate
    return forward * (3 if full else 2)  # backward: dx only (frozen) or dx + dW (full)


DEFAULTS = dict(tokens=2048, hidden=512, experts=16, top_k=4, intermediate=256, capacity_factor=2.0,
                dtypes="float32,bfloat16")


def measure(args) -> list[dict]:
    """Every (dtype, backward mode) group's backends timed side by side; checked against dense first."""
    x32 = jax.random.normal(jax.random.key(0), (1, args.tokens, args.hidden), jnp.float32)
    rows = []
    for dtype in args.dtypes.split(","):
        x = x32.astype(dtype)
        for full in (False, True):
            steps = {b: _step(_block(args, b, dtype), full) for b in BACKENDS}
            timings = time_interleaved({b: (lambda s=s: jax.block_until_ready(s(x))) for b, s in steps.items()},
                                       args.repeats, warmup=1)
            outputs = {b: step(x) for b, step in steps.items()}
            ref_value, ref_dx = None, None
            for backend, ((value, dropped), grads) in outputs.items():
                dx = np.asarray(grads[1] if full else grads, np.float32)
                if backend == "dense":
                    ref_value, ref_dx = float(value), dx
                elif int(dropped) == 0:  # dropless runs must agree with the reference
                    tol = 1e-4 if dtype == "float32" else 5e-2
                    np.testing.assert_allclose(float(value), ref_value, rtol=tol)
                    np.testing.assert_allclose(dx, ref_dx, rtol=tol, atol=tol)
                t = timings[backend]
                rows.append({"backend": backend, "dtype": dtype, "backward": "full" if full else "frozen",
                             "ms": t.median_s * 1e3, "gflops": _flops(args, full) / t.median_s / 1e9,
                             "first_s": t.first_s, "dropped": int(dropped), "loss": float(value)})
    return rows


def table(args, rows: list[dict]) -> str:
    head = (f"one layer: T={args.tokens} D={args.hidden} E={args.experts} top-{args.top_k} I={args.intermediate}, "
            f"capacity factor {args.capacity_factor}; median of {args.repeats}; loss = sum(y^2)")
    return head + "\n\n" + markdown_table(rows, [
        ("backend", "backend", "s"), ("dtype", "dtype", "s"), ("backward", "backward", "s"),
        ("ms", "fwd+bwd ms", ".1f"), ("gflops", "useful GFLOP/s", ".1f"), ("first_s", "compile+1st s", ".2f"),
        ("dropped", "dropped", "d"), ("loss", "loss", ".4f")])


def run(args) -> dict:
    """The suite's entry (benchmarks/run.py): the default layer shape, the suite's --repeats."""
    args = argparse.Namespace(**DEFAULTS, repeats=args.repeats)
    rows = measure(args)
    tables = {"Dispatch: one MoE layer, forward + backward": table(args, rows)}
    return {"shape": DEFAULTS, "rows": rows, "tables": tables}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    print(device_line(environment()))
    print(f"float32 matmul peak (jit, 2048^2): {matmul_peak_gflops():.0f} GFLOP/s\n")
    print(table(args, measure(args)))


if __name__ == "__main__":
    main()
