"""The train-step speed changes of benchmarks/RESULTS.md, re-measured side by side in one process.

    python -m benchmarks.train_step_changes [--repeats 15]

Each earlier form is restored by patching back the function a change replaced, so every variant runs in the
same process on the same batch, interleaved round by round (timings on a shared machine drift by 20-30 %
between processes; within one interleaved run they are comparable). Variants are cumulative, in commit order:

0. before: grouped matmul as one batched einsum over gathered per-block weights, attention as a 5-D GQA
   einsum, LM loss over sliced logits;
1. + grouped matmul as a loop over the blocks in use (perft_jax/models/moe/grouped.py);
2. + attention as heads-major batched matmuls (perft_jax/models/layers.py);
3. + LM loss shifting the labels instead of slicing the logits (perft_jax/perft/losses.py);
4. + `blocked` attention on CPU: causal block skipping, late softmax normalisation, hand-written backward
   (perft_jax/models/attention.py);
5. + the grouped loops over groups, then blocks: one weight slice per group, not per block (grouped.py): the
   current code.

Model: bench-small, float32, `grouped` MoE backend, PERFT-R M=4 K=2 parallel adapter (benchmarks/train_step.py).
All variants must give the same first-step loss before they are timed.
"""
from __future__ import annotations

import argparse
import contextlib
import math

import jax
import jax.numpy as jnp
import optax

from benchmarks.common import markdown_table, time_interleaved
from benchmarks.train_step import BENCHES, PERFT, JaxSide, jax_model, model_config, token_batch
from perft_jax.models import attention, layers
from perft_jax.models.moe import grouped
from perft_jax.perft import losses


def _gathered_matmul(blocks, weights, layout):
    block_group = jnp.searchsorted(layout.group_end_block, jnp.arange(blocks.shape[0]), side="right")
    group = jnp.minimum(block_group, weights.shape[0] - 1)
    return jnp.einsum("nbd,ndf->nbf", blocks, weights[group])


def _einsum_attend(self, q, k, v, mask):
    cfg = self.cfg
    b, t = q.shape[:2]
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return self.o_proj(jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, cfg.num_heads * cfg.head_dim))


def _sliced_lm_loss(logits, labels):
    logits, targets = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    valid = targets != losses.IGNORE_INDEX
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, per_token, 0.0)) / jnp.maximum(count, 1), count


def _block_loop(blocks, weights, block_group, used, transpose):
    """Change 5's earlier form: one loop over the used blocks, each slicing its group's matrix."""
    width = weights.shape[1] if transpose else weights.shape[2]

    def body(i, carry):
        out, weights = carry
        weights = jax.lax.optimization_barrier(weights)
        product = grouped._contract(blocks[i], weights[block_group[i]], 1, 1 if transpose else 0)
        return jax.lax.dynamic_update_index_in_dim(out, product.astype(out.dtype), i, 0), weights

    return jax.lax.fori_loop(0, used, body, (jnp.zeros(blocks.shape[:2] + (width,), blocks.dtype), weights))[0]


@jax.custom_vjp
def _block_loop_matmul(blocks, weights, block_group, used):
    return _block_loop(blocks, weights, block_group, used, transpose=False)


def _block_loop_fwd(blocks, weights, block_group, used):
    return _block_loop_matmul(blocks, weights, block_group, used), (weights, block_group, used)


def _block_loop_bwd(residuals, grad):  # dx only: the benchmark's base experts are frozen
    weights, block_group, used = residuals
    return _block_loop(grad, weights, block_group, used, transpose=True), jnp.zeros_like(weights), None, None


_block_loop_matmul.defvjp(_block_loop_fwd, _block_loop_bwd)


def _per_block_matmul(blocks, weights, layout):
    block_group = jnp.searchsorted(layout.group_end_block, jnp.arange(blocks.shape[0]), side="right")
    used = layout.group_end_block[weights.shape[0] - 1]
    return _block_loop_matmul(blocks, weights, jnp.minimum(block_group, weights.shape[0] - 1), used)


# The form each change replaced, in change order: variant i runs with forms i.. patched back (where two changes
# replaced the same function, the earlier change's form wins).
EARLIER_FORMS = [(grouped, "grouped_matmul", _gathered_matmul), (layers.Attention, "_attend", _einsum_attend),
                 (losses, "lm_loss", _sliced_lm_loss), (attention, "AUTO", {**attention.AUTO, "cpu": "xla"}),
                 (grouped, "grouped_matmul", _per_block_matmul)]
VARIANTS = ["0 before (gathered block weights, 5-D einsum attention, sliced logits)", "1 + grouped matmul loop",
            "2 + heads-major attention", "3 + labels shifted, not logits", "4 + blocked attention",
            "5 + group-then-block loops (current)"]


@contextlib.contextmanager
def earlier_forms(applied: int):
    """Patch back the forms replaced by changes applied+1 .. 5 while the step is traced."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in EARLIER_FORMS]
    for owner, name, old in reversed(EARLIER_FORMS[applied:]):
        setattr(owner, name, old)
    try:
        yield
    finally:
        for owner, name, current in saved:
            setattr(owner, name, current)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    bench = BENCHES["bench-small"]
    batch = token_batch(bench, bench.hf["vocab_size"])
    sides, first_losses = {}, {}
    for applied, name in enumerate(VARIANTS):
        # The capacity factor is unused by `grouped`; a distinct value gives each variant its own compiled step.
        cfg = model_config(bench, moe_backend="grouped", capacity_factor=2.0 + 0.01 * applied)
        side = JaxSide(jax_model(cfg, PERFT), batch)
        with earlier_forms(applied):
            first_losses[name] = float(side.step()["total"])  # traced and compiled under the patch
        sides[name] = side
    ref = first_losses[VARIANTS[0]]
    if any(abs(v - ref) > 1e-5 * abs(ref) for v in first_losses.values()):
        raise AssertionError(f"variants disagree on the first step's loss: {first_losses}")
    timings = time_interleaved({n: s.step for n, s in sides.items()}, args.repeats, warmup=1)
    before = timings[VARIANTS[0]].median_s
    rows, previous = [], before
    for name in VARIANTS:
        t = timings[name]
        rows.append({"variant": name, "median": t.median_s * 1e3, "best": min(t.times_s) * 1e3,
                     "delta": (t.median_s - previous) * 1e3, "speedup": before / t.median_s})
        previous = t.median_s
    print(f"bench-small float32 grouped, first-step loss {ref:.6f} in every variant; median of {args.repeats} "
          f"interleaved rounds\n")
    print(markdown_table(rows, [("variant", "variant", "s"), ("median", "step ms (median)", ".0f"),
                                ("best", "best ms", ".0f"), ("delta", "vs previous ms", "+.0f"),
                                ("speedup", "speedup vs 0", ".2f")]))


if __name__ == "__main__":
    main()
