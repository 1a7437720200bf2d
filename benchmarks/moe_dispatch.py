"""Forward + backward time of the three MoE dispatch backends on one OLMoE-shaped layer.

    python benchmarks/moe_dispatch.py [--tokens 2048 --hidden 512 --experts 16 --top-k 4 --intermediate 256]

All backends run side by side in one process on the same inputs: warm-up (compile) once, then the
median of `--repeats` timed runs. Two backward modes are timed:
- `frozen`: gradients w.r.t. the layer input only, as when the base model is frozen under PERFT;
- `full`: also w.r.t. router and expert weights (full fine-tuning), for comparison.
The loss is sum(y**2); every backend's loss and input gradient are checked against `dense` first.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from perft_jax.models.config import ModelConfig
from perft_jax.moe.block import SparseMoeBlock


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


def _time(fn, x, repeats: int) -> tuple[float, float, tuple]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(x))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times), first, out


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul throughput as XLA reaches it: the denominator for any MFU figure."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    median, _, _ = _time(jax.jit(lambda m: m @ m), a, repeats)
    return 2 * n**3 / median / 1e9


def _flops(args, full: bool) -> float:
    """Useful expert FLOPs of one fwd+bwd: only the K chosen experts per token count (dense does E/K x more)."""
    forward = 2 * args.tokens * args.top_k * 3 * args.hidden * args.intermediate
    return forward * (3 if full else 2)  # backward: dx only (frozen) or dx + dW (full)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--capacity-factor", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args(argv)

    x32 = jax.random.normal(jax.random.key(0), (1, args.tokens, args.hidden), jnp.float32)
    peak = matmul_peak_gflops()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}  "
          f"float32 matmul peak (jit, 2048^2): {peak:.0f} GFLOP/s")
    print(f"layer: T={args.tokens} D={args.hidden} E={args.experts} top-{args.top_k} I={args.intermediate}, "
          f"capacity factor {args.capacity_factor}; median of {args.repeats}\n")
    header = f"{'backend':<10} {'dtype':<9} {'backward':<8} {'fwd+bwd ms':>11} {'useful GFLOP/s':>15} " \
             f"{'compile+1st s':>14} {'dropped':>8} {'loss':>12}"
    print(header)
    print("-" * len(header))
    for dtype in args.dtypes.split(","):
        x = x32.astype(dtype)
        reference = None
        for full in (False, True):
            for backend in ("dense", "capacity", "ragged"):
                median, first, ((value, dropped), grads) = _time(_step(_block(args, backend, dtype), full), x,
                                                                 args.repeats)
                dx = grads[1] if full else grads
                if backend == "dense":
                    reference = (float(value), np.asarray(dx, np.float32))
                elif int(dropped) == 0:  # dropless runs must agree with the reference
                    tol = 1e-4 if dtype == "float32" else 5e-2
                    np.testing.assert_allclose(float(value), reference[0], rtol=tol)
                    np.testing.assert_allclose(np.asarray(dx, np.float32), reference[1], rtol=tol, atol=tol)
                print(f"{backend:<10} {dtype:<9} {'full' if full else 'frozen':<8} {median * 1e3:>11.1f} "
                      f"{_flops(args, full) / median / 1e9:>15.1f} {first:>14.2f} {int(dropped):>8} "
                      f"{float(value):>12.4f}")


if __name__ == "__main__":
    main()
