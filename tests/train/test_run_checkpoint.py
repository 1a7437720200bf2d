"""Run checkpoints: a preempted-and-resumed run is bit-identical to an uninterrupted one, and holds no base weights."""
from __future__ import annotations

import os
import signal

import chex
import jax
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_model_config

from perft_jax import UserError, init_model
from perft_jax.checkpoint.run import CheckpointConfig, PreemptionHandler, RunCheckpointer, preemption_guard
from perft_jax.data.batching import BatchIterator, RaggedRows
from perft_jax.data.config import DataConfig
from perft_jax.optim import OptimConfig, make_transform
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig
from perft_jax.train.step import train_step

MODEL = tiny_model_config(vocab_size=512)
PERFT = PerftConfig(variant="perft_r", num_adapters=4, top_k=2, dropout=0.1)  # dropout: the RNG state matters
OPTIM = OptimConfig(learning_rate=1e-2, warmup_steps=2, total_steps=8)
DATA = DataConfig(batch_size=4, cutoff_len=16, shuffle_seed=3, length_buckets=(16,))  # one shape: one compile
# One transform for every optimizer: `tx` is static in nnx.jit's cache key, so a fresh `make_optimizer` per model
# would recompile the step for each fresh model (about 9 s each on CPU). The optimizer is otherwise the same.
TX = make_transform(OPTIM)
N, K = 8, 5  # 6 batches per epoch: the resumed part crosses an epoch boundary


def _rows() -> RaggedRows:
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, MODEL.vocab_size, rng.integers(4, 13)).tolist() for _ in range(24)]
    return RaggedRows.from_lists(ids, ids)


def _setup(perft: PerftConfig = PERFT):
    model = attach_perft(init_model(MODEL, seed=1), perft, seed=2)
    return model, nnx.Optimizer(model, TX, wrt=AdapterParam), BatchIterator(_rows(), DATA)


def _train(model, optimizer, batches, steps: int, perft: PerftConfig = PERFT) -> None:
    for _ in range(steps):
        train_step(model, optimizer, next(batches), MODEL, perft)


def _run_state(model, optimizer):
    rng = jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                       else x, nnx.to_pure_dict(nnx.state(model, nnx.RngState)))
    return (nnx.to_pure_dict(nnx.state(model, AdapterParam)), nnx.to_pure_dict(nnx.state(optimizer)), rng)


def _checkpointer(tmp_path, **kw) -> RunCheckpointer:
    return RunCheckpointer(tmp_path / "ckpt", CheckpointConfig(**{"every_steps": K, **kw}))


def test_resume_is_bit_identical(tmp_path):
    model, optimizer, batches = _setup()
    _train(model, optimizer, batches, N)
    want = _run_state(model, optimizer)
    assert int(optimizer.step[...]) == N

    model, optimizer, batches = _setup()
    with _checkpointer(tmp_path) as ckpt:
        for step in range(1, K + 1):
            _train(model, optimizer, batches, 1)
            saved = ckpt.save(step, model, optimizer, batches.state(), {"base": "/nowhere", "step": step})
            assert saved == (step == K)

    model, optimizer, batches = _setup()
    reference = BatchIterator(_rows(), DATA)
    with _checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == K
        restored = ckpt.restore(model, optimizer)
    assert restored.step == K and restored.metadata == {"base": "/nowhere", "step": K}
    batches.restore(restored.data_state)
    for _ in range(K):
        next(reference)
    chex.assert_trees_all_equal(batches.state(), reference.state())
    first = next(batches)
    chex.assert_trees_all_equal(first, next(reference))
    train_step(model, optimizer, first, MODEL, PERFT)
    _train(model, optimizer, batches, N - K - 1)
    chex.assert_trees_all_equal(_run_state(model, optimizer), want)


def test_keeps_the_newest_and_async_save_completes(tmp_path):
    model, optimizer, batches = _setup()
    ckpt = _checkpointer(tmp_path, every_steps=1, keep=2, async_save=True)
    for step in range(1, 5):
        assert ckpt.save(step, model, optimizer, batches.state(), {})
    assert not ckpt.save(4, model, optimizer, batches.state(), {}, force=True)  # already saved
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["3", "4"]  # no tmp dirs left
    ckpt.close()
    assert RunCheckpointer(tmp_path / "ckpt", CheckpointConfig()).latest_step() == 4


def test_not_due_unless_forced(tmp_path):
    model, optimizer, batches = _setup()
    with _checkpointer(tmp_path, every_steps=10, async_save=False) as ckpt:
        assert not ckpt.save(3, model, optimizer, batches.state(), {})
        assert ckpt.save(3, model, optimizer, batches.state(), {}, force=True)
        assert ckpt.all_steps() == [3]


@pytest.mark.parametrize("other, key", [
    (PerftConfig(variant="perft_s", dropout=0.1), "adapters key 'layers.0.moe.adapters"),
    (PerftConfig(variant="perft_r", num_adapters=4, top_k=2, bottleneck=4, dropout=0.1),
     "adapters key 'layers.0.moe.adapters.bank.adapter_w1' is float32[4, 32, 8] in the checkpoint"),
])
def test_restore_into_another_variant_names_the_key(tmp_path, other, key):
    model, optimizer, batches = _setup()
    with _checkpointer(tmp_path) as ckpt:
        ckpt.save(K, model, optimizer, batches.state(), {})
    model, optimizer, _ = _setup(other)
    with _checkpointer(tmp_path) as ckpt, pytest.raises(UserError) as err:
        ckpt.restore(model, optimizer)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "ckpt" / str(K)) in message and key in message, message


def test_checkpoint_holds_adapters_not_the_base(tmp_path):
    model, optimizer, batches = _setup()
    _train(model, optimizer, batches, 1)
    with _checkpointer(tmp_path) as ckpt:
        ckpt.save(K, model, optimizer, batches.state(), {"base": "/base/ckpt"})
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    adapter = nbytes(nnx.state(model, AdapterParam))
    base = nbytes(nnx.state(model, nnx.All(nnx.Param, nnx.Not(AdapterParam))))
    on_disk = sum(p.stat().st_size for p in (tmp_path / "ckpt" / str(K)).rglob("*") if p.is_file())
    assert base > 5 * adapter  # the test would be meaningless otherwise
    # adapters + two AdamW moments (+ small counters, RNG keys, orbax metadata), and no base weights
    assert 2.5 * adapter < on_disk < 3.5 * adapter + 64_000, (on_disk, adapter, base)
    assert on_disk < base


def test_config_validation():
    assert CheckpointConfig().validate_config() == CheckpointConfig()
    assert str(CheckpointConfig().resolve_directory("runs/a")) == os.path.join("runs/a", "checkpoints")
    with pytest.raises(UserError, match=r"^checkpoint\.every_steps: expected a positive integer, got 0$"):
        CheckpointConfig(every_steps=0).validate_config()
    with pytest.raises(UserError, match=r"^run\.keep:"):
        CheckpointConfig(keep=-1).validate_config(prefix="run")
    with pytest.raises(UserError, match=r"^checkpoint\.async_save:"):
        CheckpointConfig(async_save="yes").validate_config()


def test_no_checkpoint_to_restore(tmp_path):
    model, optimizer, _ = _setup()
    with _checkpointer(tmp_path) as ckpt, pytest.raises(UserError, match="no run checkpoint to restore"):
        ckpt.restore(model, optimizer)


def test_sigterm_sets_the_flag_and_handlers_come_back():
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    seen = []
    with preemption_guard(seen.append) as guard:
        assert isinstance(guard, PreemptionHandler) and not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop() and guard.signum == signal.SIGTERM and seen == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before_term and signal.getsignal(signal.SIGINT) is before_int


def test_a_second_signal_goes_to_the_previous_handler():
    calls = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        previous = signal.getsignal(signal.SIGTERM)
        with PreemptionHandler() as guard:
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.should_stop() and calls == []
            os.kill(os.getpid(), signal.SIGTERM)  # impatient: the previous behaviour applies again
            assert calls == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)
