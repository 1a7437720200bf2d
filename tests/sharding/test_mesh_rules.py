"""The `mesh` config section, logical-axis rules and their one-line errors, the expert masks the ring dispatch relies
on, and the multi-host helpers — all in this process (one device); multi-device runs are in test_mesh_parity.py
and test_multihost.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec
from tiny_models import tiny_model_config

from perft_jax import UserError, init_model
from perft_jax.config import Config
from perft_jax.config_parsing import from_dict
from perft_jax.distributed import DistributedConfig, global_batch, initialize, process_rows
from perft_jax.models.moe.ep import expert_dispatch
from perft_jax.models.moe.experts import capacity_dispatch, dense_dispatch, ragged_dispatch
from perft_jax.perft.adapters import AdapterParam
from perft_jax.sharding import (
    DEFAULT_RULES,
    LogicalSharding,
    MeshConfig,
    build_mesh,
    resolve_shape,
    run_sharding,
    shard_model,
)

AXES = ("data", "fsdp", "expert", "tensor")


def _config(**mesh) -> Config:
    return from_dict(Config, {"model": {"hf_config": "unused.json"}, "mesh": mesh}, "")


def _one_line_error(fn, message: str) -> None:
    with pytest.raises(UserError) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text and message in text, text


def test_config_section_defaults_and_rule_overrides():
    cfg = _config(expert=4, logical_axis_rules={"vocab": None, "activation_batch": ["data", "fsdp"]})
    assert cfg.mesh.shape == (-1, 1, 4, 1) and cfg.mesh.expert_dispatch == "ring"
    rules = cfg.mesh.rules()
    assert rules["vocab"] == () and rules["activation_batch"] == ("data", "fsdp")
    assert rules["exp"] == ("expert",) and rules["embed"] == ("fsdp",)  # the other defaults stay
    defaults = _config().mesh.rules()
    assert sorted(defaults) == sorted(DEFAULT_RULES)
    assert defaults["activation_batch"] == ("data", "fsdp", "expert") and defaults["adapters"] == ()


@pytest.mark.parametrize("mesh, message", [
    ({"data": 0}, "mesh.data: expected a positive integer or -1 (the rest), got 0"),
    ({"data": -1, "expert": -1}, "mesh.expert: at most one mesh axis may be -1"),
    ({"logical_axis_rules": {"exp": "experts"}},
     "mesh.logical_axis_rules.exp: unknown mesh axis 'experts' (known: data, fsdp, expert, tensor)"),
    ({"logical_axis_rules": {"exp": 3}}, "mesh.logical_axis_rules.exp: expected a mesh axis, a list of mesh axes"),
    ({"logical_axis_rules": {"embed": ["fsdp", "fsdp"]}}, "mesh.logical_axis_rules.embed: mesh axis listed twice"),
    ({"expert_dispatch": "a2a"}, "mesh.expert_dispatch: expected one of 'ring', 'ragged_a2a', 'gspmd'"),
    ({"shard_adapters": "yes"}, "mesh.shard_adapters: expected true or false"),
    ({"distributed": {"coordinator_address": "10.0.0.1:1234"}}, "mesh.distributed.num_processes: expected"),
    ({"distributed": {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 2}},
     "mesh.distributed.process_id: expected an integer in [0, 2), got 2"),
    ({"distributed": {"coordinator_address": "10.0.0.1"}}, "mesh.distributed.coordinator_address: expected host:port"),
])
def test_bad_mesh_config_is_one_line_naming_the_key(mesh, message):
    _one_line_error(lambda: _config(**mesh), message)


def test_mesh_must_fit_the_devices():
    assert resolve_shape(MeshConfig(data=-1, expert=4), 8) == (2, 1, 4, 1)
    assert resolve_shape(MeshConfig(2, 2, 2, 1), 8) == (2, 2, 2, 1)
    _one_line_error(lambda: resolve_shape(MeshConfig(2, 1, 4, 1), 6),
                    "mesh: data=2, fsdp=1, expert=4, tensor=1 needs 8 devices, found 6")
    _one_line_error(lambda: resolve_shape(MeshConfig(-1, 1, 4, 1), 6),
                    "mesh: data=-1, fsdp=1, expert=4, tensor=1 does not divide the 6 devices")
    _one_line_error(lambda: build_mesh(MeshConfig(expert=2)), "does not divide the 1 devices")


def test_single_device_mesh_is_auto_and_runs_unsharded():
    mesh = build_mesh(MeshConfig())
    assert mesh.axis_names == AXES and mesh.shape == {a: 1 for a in AXES}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)  # make_mesh would default to Explicit
    assert run_sharding(MeshConfig()) is None  # one device: nothing placed, runs exactly as before


def test_logical_names_map_to_partition_specs():
    sharding = LogicalSharding.create(AbstractMesh((2, 2, 2, 1), AXES))
    assert sharding.spec(("exp", "embed_moe", "mlp_moe")) == PartitionSpec("expert", "fsdp")  # tensor=1 dropped
    assert sharding.spec(("embed", "q_heads")) == PartitionSpec("fsdp")
    assert sharding.spec(("activation_batch", None)) == PartitionSpec(("data", "fsdp", "expert"))
    assert sharding.spec((None, "activation_batch", None)) == PartitionSpec(None, ("data", "fsdp", "expert"))
    assert sharding.spec(("adapters", "embed", "adapter_rank")) == PartitionSpec(None, "fsdp")
    assert sharding.spec(("no_rule", "exp_router")) == PartitionSpec()  # unknown names are replicated


def test_adapters_replicated_unless_shard_adapters():
    mesh = AbstractMesh((2, 1, 4, 1), AXES)
    rules = {**DEFAULT_RULES, "adapters": "expert"}
    first = AdapterParam(jnp.zeros((4, 32, 8)), axes=("adapters", "embed", "adapter_rank"))
    moment = nnx.OptVariable(jnp.zeros((4, 32, 8)), axes=("adapters", "embed", "adapter_rank"))
    count = nnx.OptArray(jnp.zeros((), jnp.int32))
    for shard, want in ((False, PartitionSpec()), (True, PartitionSpec("expert"))):
        sharding = LogicalSharding.create(mesh, rules, shard_adapters=shard)
        assert sharding.variable_sharding(("w1",), first).spec == want
        assert sharding.trainable_sharding(("mu", "w1"), moment).spec == want
        assert sharding.trainable_sharding(("count",), count).spec == PartitionSpec()  # scalars stay replicated
    cfg = _config(shard_adapters=True, logical_axis_rules={"adapters": "expert"})
    assert cfg.mesh.shard_adapters and cfg.mesh.rules()["adapters"] == ("expert",)


def test_rule_errors_name_the_culprit():
    mesh = AbstractMesh((2, 2, 2, 1), AXES)
    _one_line_error(lambda: LogicalSharding.create(AbstractMesh((2, 4), ("data", "expert"))),
                    "logical_axis_rules.activation_batch: unknown mesh axis 'fsdp' (mesh axes: data, expert)")
    clash = LogicalSharding.create(mesh, {**DEFAULT_RULES, "embed_moe": "expert"})
    _one_line_error(lambda: clash.spec(("exp", "embed_moe", "mlp_moe"), what="layers.0.moe.experts.gate_up"),
                    "layers.0.moe.experts.gate_up: logical axes 'exp' and 'embed_moe' both map to mesh axis 'expert'")
    _one_line_error(lambda: LogicalSharding.create(mesh).spec(("exp", None), (5, 4), what="gate_up"),
                    "gate_up: dimension 0 (exp, size 5) does not divide over mesh axes ['expert'] of 2 devices")


TOKENS, K, E, D, I = 24, 2, 8, 16, 8


@jax.jit
def _moe_inputs(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (TOKENS, D))
    logits = jax.random.normal(keys[1], (TOKENS, E))
    weights, indices = jax.lax.top_k(jax.nn.softmax(logits), K)
    gate_up = jax.random.normal(keys[2], (E, D, 2 * I)) * 0.3
    down = jax.random.normal(keys[3], (E, I, D)) * 0.3
    return x, weights, indices.astype(jnp.int32), gate_up, down


@pytest.mark.parametrize("backend", ["dense", "capacity", "ragged"])
def test_expert_masks_split_the_work_exactly(backend):
    """What each device of the ring computes: its own experts' pairs only; the shards' sum is the whole layer."""
    x, weights, indices, gate_up, down = _moe_inputs()
    cap = 2 * TOKENS  # no drops: capacity then computes exactly what dense does

    @jax.jit  # one program per call shape instead of op-by-op dispatch
    def run(w, idx, gu, dn, valid=None):
        if backend == "dense":
            return dense_dispatch(x, w, idx, gu, dn, valid)[0]
        if backend == "capacity":
            return capacity_dispatch(x, w, idx, gu, dn, valid, capacity_factor=2.0, cap=cap)[0]
        return ragged_dispatch(x, w, idx, gu, dn, valid)[0]

    whole = run(weights, indices, gate_up, down)
    parts = []
    for shard in range(4):  # 4 devices along `expert`, 2 experts each
        local = indices - 2 * shard
        valid = (local >= 0) & (local < 2)
        parts.append(run(weights, jnp.where(valid, local, 0), gate_up[2 * shard:2 * shard + 2],
                         down[2 * shard:2 * shard + 2], valid))
    np.testing.assert_allclose(sum(parts), whole, rtol=1e-5, atol=1e-6)
    reference = jax.jit(dense_dispatch)(x, weights, indices, gate_up, down)[0]
    np.testing.assert_allclose(whole, reference, rtol=1e-5, atol=1e-6)


def test_capacity_mask_counts_only_local_drops():
    x, weights, indices, gate_up, down = _moe_inputs(1)
    valid = indices < 4  # pairs of experts 0..3 only
    dispatch = jax.jit(capacity_dispatch, static_argnames=("capacity_factor", "cap"))
    _, dropped_all = dispatch(x, weights, indices, gate_up, down, None, capacity_factor=1.0, cap=1)
    _, dropped_local = dispatch(x, weights, jnp.where(valid, indices, 0), gate_up, down, valid, capacity_factor=1.0,
                                cap=1)
    used = len(set(np.asarray(indices[valid]).tolist()))  # one slot per used expert survives
    assert int(dropped_local) == int(valid.sum()) - used
    assert int(dropped_all) == TOKENS * K - len(set(np.asarray(indices).ravel().tolist()))


def test_ring_dispatch_on_a_one_device_mesh_matches():
    cfg = tiny_model_config("mixtral", num_layers=1)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)
    forward = nnx.jit(lambda m, i: m(i).logits)
    want = forward(init_model(cfg, seed=2), ids)
    sharding = LogicalSharding.create(build_mesh(MeshConfig()))
    model = shard_model(init_model(cfg, seed=2, dispatch=expert_dispatch(sharding, "ring", cfg)), sharding)
    assert type(model.layers[0].moe.experts.dispatch).__name__ == "RingOfExperts"
    np.testing.assert_allclose(forward(model, ids), want, rtol=1e-5, atol=1e-6)
    _one_line_error(lambda: expert_dispatch(sharding, "a2a", cfg), "mesh.expert_dispatch")
    # ragged_a2a with the experts on one device: nothing travels, so it is the (local) ring.
    assert type(expert_dispatch(sharding, "ragged_a2a", cfg)).__name__ == "RingOfExperts"


class _FakeSharding:
    """The part of a sharding `process_rows` reads: which slice each of this process's devices holds."""

    def __init__(self, *rows: tuple[int, int]):
        self.rows = rows

    def addressable_devices_indices_map(self, shape):
        return {device: (slice(*r), slice(None)) for device, r in enumerate(self.rows)}


def test_process_rows_is_one_block_per_process():
    assert process_rows(_FakeSharding((2, 4), (0, 2), (0, 2)), (8, 5)) == slice(0, 4)  # replicas counted once
    assert process_rows(_FakeSharding((4, 8)), (8, 5)) == slice(4, 8)
    _one_line_error(lambda: process_rows(_FakeSharding((0, 2), (4, 6)), (8, 5)),
                    "mesh: this process's devices hold batch rows [(0, 2), (4, 6)] with gaps between them")


def test_single_process_helpers():
    assert initialize(DistributedConfig()) is False  # nothing configured: stays a single-process run
    batch = {"input_ids": np.arange(12, dtype=np.int32).reshape(4, 3)}
    sharding = jax.sharding.NamedSharding(build_mesh(MeshConfig()), PartitionSpec("data"))
    assert process_rows(sharding, (4, 3)) == slice(0, 4)
    placed = global_batch(batch, sharding)
    np.testing.assert_array_equal(placed["input_ids"], batch["input_ids"])
    assert placed["input_ids"].sharding == sharding
    accumulated = {"input_ids": np.arange(24, dtype=np.int32).reshape(2, 4, 3)}  # [A, B, T]: rows are dim 1
    rows_sharding = LogicalSharding.create(sharding.mesh).batch_sharding((2, 4, 3), batch_dim=1)
    assert rows_sharding.spec == PartitionSpec()  # one device: nothing to split
    np.testing.assert_array_equal(global_batch(accumulated, rows_sharding, 1)["input_ids"], accumulated["input_ids"])
