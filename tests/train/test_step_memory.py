"""Compiled steps hold the frozen base once (issue 11), read off XLA's own memory analysis.

The models are real width (OLMoE-1B-7B: hidden 2048, 64 experts of 1024, vocab 50304; Mixtral-8x7B: hidden 4096,
8 experts of 14336), in bfloat16, cut to one or two layers, and never materialised: the steps are lowered on
abstract arrays and compiled, which costs no memory. For every PERFT variant and qv_lora:
- the train step's outputs are exactly the adapters (with their dropout RNG state), the optimizer state and the
  metrics, and the adapter and optimizer buffers are donated (aliased to the outputs), so nothing base-sized
  leaves the step;
- its temporaries are a small fraction of the base: a float32 copy of the base's weights (what XLA:CPU made
  of bfloat16 weight slices and transposes) would be twice the base's bytes;
- adding a layer adds activations, not weights, to the temporaries;
- validation and generation (greedy, beam search) return losses or tokens only.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks.flops import train_step_args
from perft_jax.eval import generate as gen
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.models.hf_config import read_hf_config_file
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig
from perft_jax.train.step import eval_step_fn, train_step_fn
from tests.testing_utils import CONFIGS

MiB = 2**20
BATCH, LENGTH = 1, 64
VARIANTS = {
    "perft_s": PerftConfig(variant="perft_s", bottleneck=16),
    "perft_d": PerftConfig(variant="perft_d", num_adapters=4, bottleneck=16),
    "perft_r": PerftConfig(variant="perft_r", adapter="parallel_adapter", num_adapters=8, top_k=2, bottleneck=32),
    "perft_r_dynmole": PerftConfig(variant="perft_r", num_adapters=8, router="dynmole", bottleneck=16),
    "perft_e": PerftConfig(variant="perft_e", bottleneck=16),
    "qv_lora": PerftConfig(variant="qv_lora", bottleneck=16),
}


def real_width(arch: str, layers: int, backend: str = "grouped"):
    cfg, _, _ = read_hf_config_file(CONFIGS / "hf" / f"{arch}.json")
    return cfg.replace(num_layers=layers, dtype="bfloat16", param_dtype="bfloat16", moe_backend=backend)


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def assert_outputs_are(memory, tree) -> None:
    """XLA's output bytes are the arrays of `tree` plus the output tuple's table (8 bytes an entry)."""
    expected = nbytes(tree)
    assert expected <= memory.output_size_in_bytes <= expected + 8 * (len(jax.tree.leaves(tree)) + 1)


@dataclasses.dataclass
class Compiled:
    base: int  # bytes of the frozen state
    trainable: int  # adapters + their RNG state
    optimizer: int
    outputs: object  # the step's output avals: (trainable, optimizer state, metrics)
    memory: object  # XLA's CompiledMemoryStats


def compile_train_step(cfg, perft: PerftConfig, batch: int = BATCH) -> Compiled:
    args = train_step_args(cfg, perft, batch, LENGTH)
    _, _, trainable, frozen, opt_state, *_ = args
    lowered = train_step_fn.lower(*args)
    return Compiled(nbytes(frozen), nbytes(trainable), nbytes(opt_state), lowered.out_info,
                    lowered.compile().memory_analysis())


def assert_holds_base_once(c: Compiled) -> None:
    trained, optimizer, metrics = c.outputs
    assert nbytes(trained) == c.trainable and nbytes(optimizer) == c.optimizer
    assert nbytes(metrics) < 4096  # loss terms, per-layer router statistics, gradient norm
    assert_outputs_are(c.memory, c.outputs)
    assert c.memory.alias_size_in_bytes == c.trainable + c.optimizer  # donated: updated in place
    assert c.trainable + c.optimizer < c.base / 20


@pytest.fixture(scope="module")
def olmoe_steps() -> dict[str, Compiled]:
    cfg = real_width("olmoe-1b-7b", 1)
    return {name: compile_train_step(cfg, perft) for name, perft in VARIANTS.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step_returns_only_what_it_trains(olmoe_steps, variant):
    assert_holds_base_once(olmoe_steps[variant])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step_temporaries_are_activations_not_weights(olmoe_steps, variant):
    c = olmoe_steps[variant]
    # 64 tokens of activations; one float32 copy of this layer's experts alone would be 1 GiB.
    assert c.memory.temp_size_in_bytes < c.base / 8, f"{c.memory.temp_size_in_bytes / MiB:.0f} MiB"


def test_temporaries_grow_with_the_batch_and_not_with_the_base(olmoe_steps):
    perft = VARIANTS["perft_r"]
    one = olmoe_steps["perft_r"]
    two_layers = compile_train_step(real_width("olmoe-1b-7b", 2), perft)
    added_base = two_layers.base - one.base  # one more layer's weights: 800 MiB
    assert two_layers.memory.temp_size_in_bytes - one.memory.temp_size_in_bytes < added_base / 16
    double_batch = compile_train_step(real_width("olmoe-1b-7b", 1), perft, batch=2 * BATCH)
    assert double_batch.memory.temp_size_in_bytes > 1.3 * one.memory.temp_size_in_bytes


# `ragged` (jax.lax.ragged_dot) is left out: XLA:CPU lowers it with float32 copies of the expert weights
# (1.8 GiB of temporaries at OLMoE width, 1 layer); it is meant for GPU/TPU, where issue 13 chooses kernels.
@pytest.mark.parametrize("backend", ["dense", "capacity"])
def test_other_backends_hold_the_base_once(backend):
    c = compile_train_step(real_width("olmoe-1b-7b", 1, backend), VARIANTS["perft_r"])
    assert_holds_base_once(c)
    assert c.memory.temp_size_in_bytes < c.base / 8, f"{c.memory.temp_size_in_bytes / MiB:.0f} MiB"


def test_mixtral_width_train_step_holds_the_base_once():
    c = compile_train_step(real_width("mixtral-8x7b", 1), VARIANTS["perft_r"])
    assert_holds_base_once(c)
    assert c.memory.temp_size_in_bytes < c.base / 8, f"{c.memory.temp_size_in_bytes / MiB:.0f} MiB"


@pytest.fixture(scope="module")
def olmoe_eval_model():
    cfg = real_width("olmoe-1b-7b", 1)
    model = nnx.eval_shape(lambda: attach_perft(MoeForCausalLM(cfg, nnx.Rngs(0)), VARIANTS["perft_r"]))
    graphdef, state = nnx.split(nnx.view(model, only=nnx.Dropout, deterministic=True, raise_if_not_found=False))
    return cfg, graphdef, state


def test_validation_step_returns_losses_only(olmoe_eval_model):
    cfg, graphdef, state = olmoe_eval_model
    tokens = {k: jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32) for k in ("input_ids", "labels", "attention_mask")}
    lowered = eval_step_fn.lower(graphdef, state, tokens, cfg, VARIANTS["perft_r"])
    memory = lowered.compile().memory_analysis()
    assert_outputs_are(memory, lowered.out_info)
    assert nbytes(lowered.out_info) < 4096
    assert memory.temp_size_in_bytes < nbytes(state) / 8


@pytest.mark.parametrize("num_beams", [1, 4])
def test_generation_returns_tokens_only(olmoe_eval_model, num_beams):
    cfg, graphdef, state = olmoe_eval_model
    rows, new = 2, 4
    ids = jax.ShapeDtypeStruct((rows, LENGTH), jnp.int32)
    scalars = (jax.ShapeDtypeStruct((), jnp.int32),) * 2
    if num_beams == 1:
        lowered = gen._greedy.lower(graphdef, state, ids, ids, *scalars, max_new_tokens=new)
    else:
        flags = (jax.ShapeDtypeStruct((), jnp.bool_),) * 2 + (jax.ShapeDtypeStruct((), jnp.float32),)
        lowered = gen._beam_search.lower(graphdef, state, ids, ids, *scalars, *flags, max_new_tokens=new,
                                         num_beams=num_beams)
    memory = lowered.compile().memory_analysis()
    assert nbytes(lowered.out_info) == rows * new * 4 + rows * 4  # tokens [B, new] and lengths [B], int32
    assert_outputs_are(memory, lowered.out_info)
    # The KV cache and logits of B * N rows, not the weights.
    assert memory.temp_size_in_bytes < nbytes(state) / 8, f"{memory.temp_size_in_bytes / MiB:.0f} MiB"
