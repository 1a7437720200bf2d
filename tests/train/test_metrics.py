"""Router statistics on hand-crafted router logits, their accumulator, and the run logs (JSONL, TB, PNG)."""
from __future__ import annotations

import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from perft_jax.models.decoder import MoeLMOutput
from perft_jax.perft.config import PerftConfig
from perft_jax.perft.dynmole import DynMoLEConfig
from perft_jax.train.metrics import MetricsWriter, draw_router_heatmaps
from perft_jax.train.router_stats import RouterStatsAccumulator, router_statistics, router_stats_scalars

MODEL = tiny_model_config(vocab_size=16, hidden_size=8, intermediate_size=8, num_heads=2, num_kv_heads=1, head_dim=4)
MASK = jnp.array([[1, 1, 1], [0, 1, 1]], jnp.int32)  # 5 real tokens; (b=1, t=0) is padding
Q8 = [0.5, 0.25, 0.125, 0.125]  # normalised Shannon entropy: (0.5 ln2 + 0.25 ln4 + 0.25 ln8) / ln4 = 0.875
ONE_HOT_LOGITS = [-10.0, -10.0, 0.0, 10.0]  # padding rows: argmax 3, then 2, entropy ~0
# Jitted as a training step would call it (and one compile is faster than op-by-op dispatch).
stats_fn = jax.jit(router_statistics, static_argnames=("perft_cfg", "model_cfg"))


def _logits(probs_per_token) -> jnp.ndarray:
    """Logits whose softmax is exactly the given probabilities (log p; softmax is shift invariant)."""
    return jnp.log(jnp.asarray(probs_per_token, jnp.float32))


def _output(router_logits, adapter_logits=None) -> MoeLMOutput:
    b, t = router_logits.shape[1:3]
    return MoeLMOutput(logits=jnp.zeros((b, t, 16)), router_logits=router_logits, dropped_tokens=jnp.zeros(2),
                       adapter_router_logits=adapter_logits)


def _base_logits() -> jnp.ndarray:
    """[L=2, B=2, T=3, E=4]. Layer 0: Q8 permuted so the top-2 is known; layer 1: uniform (ties -> {0, 1})."""
    def perm(first, second):
        rest = [e for e in range(4) if e not in (first, second)]
        p = np.zeros(4)
        p[[first, second, *rest]] = Q8
        return p

    layer0 = np.log([[perm(0, 1), perm(0, 2), perm(2, 3)], [perm(3, 2), perm(0, 1), perm(1, 3)]])
    layer0[1, 0] = ONE_HOT_LOGITS  # padding: would shift the load and the entropy if counted
    layer1 = np.zeros((2, 3, 4))
    layer1[1, 0] = ONE_HOT_LOGITS
    return jnp.asarray(np.stack([layer0, layer1]), jnp.float32)


def test_base_router_stats_exclude_padding():
    stats = stats_fn(_output(_base_logits()), MASK, perft_cfg=PerftConfig(variant="perft_s"), model_cfg=MODEL)
    assert set(stats) == {"tokens", "base/load", "base/entropy"}  # no routed adapters -> no adapter keys
    # Layer 0 real tokens pick {0,1} {0,2} {2,3} {0,1} {1,3}: counts 3 3 2 2 of 5; layer 1 always {0, 1}.
    np.testing.assert_allclose(stats["base/load"], [[0.6, 0.6, 0.4, 0.4], [1.0, 1.0, 0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(stats["base/entropy"], [0.875, 1.0], atol=1e-5)
    assert float(stats["tokens"]) == 5.0


def test_topk_adapter_router_stats():
    # M = 3, K = 1. Layer 0: probs (0.5, 0.25, 0.25) with the 0.5 on adapters 0 0 1 | pad | 2 0.
    tokens = [[[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]],
              [[0.01, 0.01, 0.98], [0.25, 0.25, 0.5], [0.5, 0.25, 0.25]]]
    layer1 = np.full((2, 3, 3), 1 / 3)
    layer1[1, 0] = [0.01, 0.01, 0.98]
    adapter = _logits(np.stack([tokens, layer1]))  # [2, 2, 3, 3]
    perft = PerftConfig(variant="perft_r", num_adapters=3, top_k=1)
    stats = stats_fn(_output(_base_logits(), adapter), MASK, perft_cfg=perft, model_cfg=MODEL)
    assert "adapter/broadcast_frac" not in stats
    np.testing.assert_allclose(stats["adapter/load"], [[0.6, 0.2, 0.2], [1.0, 0.0, 0.0]], atol=1e-6)
    shannon = 1.5 * math.log(2) / math.log(3)  # (0.5 ln2 + 2 * 0.25 ln4) / ln3
    np.testing.assert_allclose(stats["adapter/entropy"], [shannon, 1.0], atol=1e-5)


def _tsallis(p, q=1.1, eps=1e-5):
    p = np.asarray(p, np.float64) + eps
    return (1 - np.sum(p**q)) / (q - 1) / ((1 - len(p) ** (1 - q)) / (q - 1))


def test_dynmole_adapter_router_stats():
    dyn = DynMoLEConfig(top_p=0.8, keep_top_k=1, entropy_threshold=0.9, entropy_index=1.1)
    perft = PerftConfig(variant="perft_r", num_adapters=4, top_k=1, router="dynmole", dynmole=dyn)
    onehot3 = np.exp(ONE_HOT_LOGITS) / np.exp(ONE_HOT_LOGITS).sum()
    # Real tokens: Q8 -> top-p keeps {0, 1} (0.5, 0.75 <= 0.8); uniform -> broadcast to all 4; peaked -> {3}.
    probs = np.array([[Q8, [0.25] * 4, onehot3, onehot3[[0, 1, 3, 2]]]])  # [B=1, T=4, M=4]; last is padding
    mask = jnp.array([[1, 1, 1, 0]])
    base = jnp.zeros((1, 1, 4, 4))
    assert _tsallis(Q8) < 0.9 < _tsallis([0.25] * 4)  # only the uniform token broadcasts
    stats = stats_fn(_output(base, _logits(probs[None])), mask, perft_cfg=perft, model_cfg=MODEL)
    np.testing.assert_allclose(stats["adapter/load"], [[2 / 3, 2 / 3, 1 / 3, 2 / 3]], atol=1e-6)
    np.testing.assert_allclose(stats["adapter/num_selected"], [7 / 3], atol=1e-6)
    np.testing.assert_allclose(stats["adapter/broadcast_frac"], [1 / 3], atol=1e-6)
    expected = (_tsallis(Q8) + _tsallis([0.25] * 4) + _tsallis(onehot3)) / 3
    np.testing.assert_allclose(stats["adapter/entropy"], [expected], atol=1e-5)


def test_accumulator_weights_steps_by_tokens():
    acc = RouterStatsAccumulator()
    assert acc.mean() == {}
    acc.update({"tokens": jnp.float32(3), "base/load": jnp.array([[1.0, 0.0]]), "base/entropy": jnp.array([0.0])})
    acc.update({"tokens": np.float32(1), "base/load": np.array([[0.0, 1.0]]), "base/entropy": np.array([1.0])})
    mean = acc.mean()
    np.testing.assert_allclose(mean["base/load"], [[0.75, 0.25]])
    np.testing.assert_allclose(mean["base/entropy"], [0.25])
    assert float(mean["tokens"]) == 4.0 and acc.count == 2
    with pytest.raises(ValueError, match="keys changed"):
        acc.update({"tokens": 1.0, "base/load": np.zeros((1, 2))})
    acc.reset()
    assert acc.mean() == {} and acc.count == 0


def test_router_stats_scalars():
    scalars = router_stats_scalars({"tokens": np.asarray(5.0), "base/entropy": np.array([0.5, 1.0]),
                                    "base/load": np.array([[0.5, 0.5], [1.0, 0.0]])})
    assert scalars == {"router/tokens": 5.0, "router/base/entropy/layer_00": 0.5,
                       "router/base/entropy/layer_01": 1.0, "router/base/load_imbalance/layer_00": 1.0,
                       "router/base/load_imbalance/layer_01": 2.0}


def _read_tb_scalars(event_dir) -> dict[str, list[tuple[int, float]]]:
    """Parses TFRecord-framed Event protos (u64 length, u32 crc, data, u32 crc) with tensorboardX's proto."""
    from tensorboardX.proto import event_pb2

    files = list(event_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    data, pos, scalars = files[0].read_bytes(), 0, {}
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
    def strict(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    with MetricsWriter(tmp_path / "run") as writer:
        writer.write(1, {"lm": jnp.float32(2.5), "num_tokens": jnp.int32(7), "bad": float("nan"),
                         "router/base/entropy": np.array([0.5, 1.0])})
        writer.write(2, {"lm": 2.0}, split="eval")
    lines = [json.loads(line, parse_constant=strict)
             for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in lines] == [(1, "train"), (2, "eval")]
    assert lines[0]["lm"] == 2.5 and lines[0]["num_tokens"] == 7 and lines[0]["bad"] is None
    assert "router/base/entropy" not in lines[0] and lines[1]["lm"] == 2.0
    arrays = [json.loads(line) for line in (tmp_path / "run" / "arrays.jsonl").read_text().splitlines()]
    assert arrays == [{"step": 1, "split": "train", "router/base/entropy": [0.5, 1.0]}]
    scalars = _read_tb_scalars(tmp_path / "run" / "tensorboard")
    assert scalars["train/lm"] == [(1, 2.5)] and scalars["eval/lm"] == [(2, 2.0)]
    assert scalars["train/num_tokens"] == [(1, 7.0)] and "train/bad" not in scalars
    with pytest.raises(ValueError, match="reserved"):
        MetricsWriter(tmp_path / "other", tensorboard=False).write(0, {"step": 1})


def test_non_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "run", is_writer=False)
    writer.write(1, {"lm": 1.0, "arr": np.ones(3)})
    writer.close()
    assert not (tmp_path / "run").exists()


def _stats(num_layers, num_adapters, num_experts, dynmole):
    """Plausible accumulated statistics (top-2 loads capped at 1) for the drawing tests."""
    rng = np.random.default_rng(0)

    def load(n):
        return np.minimum(rng.dirichlet(np.ones(n), num_layers) * 2, 1.0)

    stats = {"tokens": np.asarray(100.0), "base/load": load(num_experts),
             "base/entropy": rng.uniform(0.6, 1.0, num_layers)}
    if num_adapters:
        stats["adapter/load"] = load(num_adapters)
        stats["adapter/entropy"] = rng.uniform(0.3, 1.0, num_layers)
    if dynmole:
        stats["adapter/broadcast_frac"] = rng.uniform(0.0, 0.4, num_layers)
        stats["adapter/num_selected"] = rng.uniform(2.0, 3.0, num_layers)
    return stats


@pytest.mark.parametrize("num_adapters,dynmole", [(4, True), (0, False)])
def test_router_heatmap_png(tmp_path, num_adapters, dynmole):
    import matplotlib.image

    path = draw_router_heatmaps(_stats(6, num_adapters, 8, dynmole), tmp_path / "plots" / "router.png",
                                title="test run", figsize=(12, 8), dpi=50)
    assert path == tmp_path / "plots" / "router.png" and sorted(p.name for p in path.parent.iterdir()) == ["router.png"]
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (400, 600)  # figsize * dpi, (height, width)
    assert image[..., :3].std() > 0.05  # not a blank canvas
