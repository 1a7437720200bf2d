"""The training run: base + adapters, data, AdamW over adapters, validation, checkpoints, metrics.

`run_training(cfg)` resumes from the newest run checkpoint in `train.output_dir` when there is one, so
re-running the same command after a preemption (SIGTERM / SIGINT save and exit 0; `kill -9` loses at
most the steps since the last checkpoint) continues the run exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from perft_jax.build import build_model, load_base_tokenizer
from perft_jax.checkpoint.run import RunCheckpointer, preemption_guard
from perft_jax.config import Config
from perft_jax.data.batching import BatchIterator, RaggedRows, eval_batches
from perft_jax.data.dataset import build_training_data
from perft_jax.distributed import any_process, global_batch, initialize
from perft_jax.errors import UserError, disk_errors
from perft_jax.labels import IGNORE_INDEX
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.models.moe.experts import describe_backend
from perft_jax.optim import learning_rate_schedule
from perft_jax.perft.adapter_files import save_adapters
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.efficiency import efficiency_report, format_report
from perft_jax.sharding import LogicalSharding, run_sharding
from perft_jax.train.keep_best import resumed_best
from perft_jax.train.metrics import MetricsWriter, draw_router_heatmaps
from perft_jax.train.optim import make_optimizer
from perft_jax.train.router_stats import RouterStatsAccumulator, router_stats_scalars
from perft_jax.train.step import eval_step, train_step
from perft_jax.train.summary import format_summary, no_best_reason
from perft_jax.wandb_logger import import_wandb


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left as it was."""


def _save_adapters(model: MoeForCausalLM, out_dir: pathlib.Path, sharding: LogicalSharding | None,
                   is_writer: bool, step: int, base: str) -> None:
    """Process 0 writes the adapter files, recording the step (evaluation logs its results at it) and the base
    they were trained on (`base_model_name_or_path`: the converted checkpoint, or "" for a random base). Adapters
    split over the mesh (`mesh.shard_adapters`) are first gathered into a replicated copy by every process (a
    collective), then put back as they were."""
    metadata = {"step": step, "base_model_name_or_path": base or None}
    if sharding is None or not sharding.shard_adapters:
        if is_writer:
            save_adapters(model, out_dir, metadata, overwrite=True)
        return
    state = nnx.state(model, AdapterParam)
    nnx.update(model, jax.jit(lambda s: s, out_shardings=sharding.replicated)(state))
    if is_writer:
        save_adapters(model, out_dir, metadata, overwrite=True)
    nnx.update(model, state)


def _to_device(batch: dict[str, np.ndarray], sharding: LogicalSharding | None) -> dict[str, jax.Array]:
    """Host batch [B, T] (or [A, B, T]) -> device arrays; on a mesh, rows split over the batch axes and each
    process transferring only its own rows."""
    if sharding is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    shape = next(iter(batch.values())).shape
    batch_dim = len(shape) - 2
    return global_batch(batch, sharding.batch_sharding(shape, batch_dim), batch_dim)


def _validation_loss(model, rows: RaggedRows | None, cfg: Config, pad_id: int,
                     sharding: LogicalSharding | None = None) -> float | None:
    if rows is None or len(rows) == 0:
        return None
    total, tokens = 0.0, 0
    for batch in eval_batches(rows, cfg.data, pad_id):
        losses = eval_step(model, _to_device(batch, sharding), model.config, cfg.perft)
        count = int(losses["num_tokens"])
        total += float(losses["lm"]) * count
        tokens += count
    return total / max(tokens, 1)


def _next_batch(iterator: BatchIterator, accum: int, sharding: LogicalSharding | None = None) -> dict[str, jax.Array]:
    if accum == 1:
        return _to_device(next(iterator), sharding)
    micro = [next(iterator) for _ in range(accum)]
    length = max(b["input_ids"].shape[1] for b in micro)  # micro-batches of one step share a length
    if any(b["input_ids"].shape[1] != length for b in micro):
        micro = [_left_pad(b, length, iterator.pad_id) for b in micro]
    return _to_device({k: np.stack([b[k] for b in micro]) for k in micro[0]}, sharding)


def _left_pad(batch: dict, length: int, pad_id: int) -> dict:
    extra = length - batch["input_ids"].shape[1]
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {k: np.pad(v, ((0, 0), (extra, 0)), constant_values=fill[k]) for k, v in batch.items()}


def run_training(cfg: Config) -> dict:
    """Train the adapters of `cfg`; returns a summary (steps, losses, where adapters were written).

    With several devices (or processes, `mesh.distributed`), the run is one SPMD program over the mesh of
    `cfg.mesh`; every process runs this same function.
    """
    initialize(cfg.mesh.distributed)  # multi-host: before anything touches a device
    sharding = run_sharding(cfg.mesh)
    if sharding is None:
        return _run_training(cfg, None)
    with jax.set_mesh(sharding.mesh):  # the run's mesh, the default for everything it jits
        return _run_training(cfg, sharding)


def _run_training(cfg: Config, sharding: LogicalSharding | None) -> dict:
    started = time.perf_counter()
    if cfg.mode != "train":  # config.json records what ran: a training config, reusable as --config
        raise UserError(f"mode={cfg.mode}: run_training trains; evaluate with perft_jax.eval.pipeline.run_evaluation")
    if cfg.train.wandb.mode:
        import_wandb(cfg.train.wandb)  # a missing optional dependency fails before anything is created
    is_writer = jax.process_index() == 0  # only process 0 writes files, logs and progress bars
    run_dir = pathlib.Path(cfg.train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.output_dir: {str(run_dir)!r} is a file, not a run directory")
    # Everything bad input can break (the tokenizer and its fit to the base, every data row, the batching, the
    # base's weights) runs before the run directory exists: a run that fails there leaves nothing behind. The
    # `datasets` cache is temporary: the tokenised rows are copied into memory.
    tokenizer = load_base_tokenizer(cfg.model, cfg.data.pad_id)
    with tempfile.TemporaryDirectory(prefix="perft-datasets-") as cache_dir:
        data = build_training_data(cfg.data, tokenizer, cache_dir=cache_dir)
        train_rows = RaggedRows.from_dataset(data.train)
        val_rows = RaggedRows.from_dataset(data.val) if data.val is not None and len(data.val) else None
    pad_id = cfg.data.pad_id
    iterator = BatchIterator(train_rows, cfg.data, pad_id)
    model = build_model(cfg.model, cfg.perft, sharding, expert_dispatch=cfg.mesh.expert_dispatch, seed=cfg.train.seed)
    with disk_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        if is_writer:
            (run_dir / "config.json").write_text(cfg.to_json() + "\n")
    if is_writer:
        print(format_report(efficiency_report(model.config, cfg.perft)))
        print(f"MoE backend: {describe_backend(model.config, jax.devices()[0].platform)}")
    accum = cfg.train.grad_accum_steps
    steps_per_epoch = max(iterator.steps_per_epoch // accum, 1)
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    optim_cfg = cfg.optim if cfg.optim.total_steps else dataclasses.replace(cfg.optim, total_steps=total_steps)
    optimizer = make_optimizer(model, optim_cfg)
    schedule = learning_rate_schedule(optim_cfg)

    checkpointer = RunCheckpointer(cfg.checkpoint.resolve_directory(run_dir), cfg.checkpoint)
    step, best = 0, {"val_loss": None, "step": None}
    if checkpointer.latest_step() is not None:
        restored = checkpointer.restore(model, optimizer)
        step = restored.step
        iterator.restore(restored.data_state)
        best = resumed_best(run_dir / "best_adapters", restored.metadata.get("best", best), is_writer)
        if is_writer:
            print(f"resumed from step {step} ({checkpointer.directory})")

    writer = MetricsWriter(run_dir, is_writer=is_writer, tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb,
                           config=json.loads(cfg.to_json()))
    router_stats = RouterStatsAccumulator()
    metadata = lambda: {"config": json.loads(cfg.to_json()), "best": best}  # noqa: E731
    summary = {"total_steps": total_steps, "start_step": step}
    bar = None  # made after this process's first step, so that its rate and ETA leave the compile out
    window_tokens, window_start = 0, time.perf_counter()
    with preemption_guard() as guard:
        while step < total_steps:
            batch = _next_batch(iterator, accum, sharding)
            step_start = time.perf_counter()
            metrics = train_step(model, optimizer, batch, model.config, cfg.perft)
            if bar is None:
                jax.block_until_ready(metrics)
                if is_writer:
                    print(f"step {step + 1}: {time.perf_counter() - step_start:.1f} s, compiling the train step "
                          "included (once per run; the steps after it reuse it)", flush=True)
                bar = tqdm(total=total_steps, initial=step, desc="training", unit="step",
                           disable=not (cfg.train.progress_bar and is_writer))
            router_stats.update(jax.device_get(metrics.pop("router")))
            loss = float(metrics["total"])
            if not math.isfinite(loss):
                checkpointer.wait_until_finished()
                raise TrainingDiverged(
                    f"loss became {loss} at step {step + 1}; stopped without saving. The last good checkpoint "
                    f"(step {checkpointer.latest_step()}) in {checkpointer.directory} is intact: lower "
                    "optim.learning_rate or check the data, then rerun the same command to resume")
            step += 1
            window_tokens += int(metrics["num_tokens"])
            if step % cfg.train.log_every_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                scalars = {k: float(v) for k, v in metrics.items()}
                scalars.update(router_stats_scalars(router_stats.mean()))
                scalars["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                scalars["learning_rate"] = float(schedule(step))
                writer.write(step, scalars, split="train")
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{scalars['tokens_per_s']:.0f}")
                window_tokens, window_start = 0, time.perf_counter()
            if cfg.train.eval_every_steps and (step % cfg.train.eval_every_steps == 0 or step == total_steps):
                val_loss = _validation_loss(model, val_rows, cfg, pad_id, sharding)
                if val_loss is not None:
                    writer.write(step, {"lm": val_loss}, split="val")
                    if cfg.train.keep_best and (best["val_loss"] is None or val_loss < best["val_loss"]):
                        best = {"val_loss": val_loss, "step": step}
                        _save_adapters(model, run_dir / "best_adapters", sharding, is_writer, step,
                                       cfg.model.checkpoint)
            bar.update(1)
            # Multi-host: a signal that reached any process stops all of them after this same step.
            stop = any_process(guard.should_stop())
            checkpointer.save(step, model, optimizer, iterator.state(), metadata(), force=step == total_steps or stop)
            if stop:
                checkpointer.wait_until_finished()
                if is_writer:
                    print(f"\nstopped by signal at step {step}; checkpoint saved, rerun the same command to resume")
                summary.update(stopped=True, step=step)
                bar.close()
                writer.close()
                return summary
    if bar is not None:
        bar.close()
    checkpointer.wait_until_finished()
    _save_adapters(model, run_dir / "adapters", sharding, is_writer, step, cfg.model.checkpoint)
    if is_writer and router_stats.count:
        draw_router_heatmaps(router_stats.mean(), run_dir / "router_stats.png")
    writer.close()
    best_dir = str(run_dir / "best_adapters") if best["step"] else None
    views = {"tensorboard": str(run_dir / "tensorboard")} if cfg.train.tensorboard else {}
    if cfg.train.wandb.mode:
        views["W&B"] = f"{cfg.train.wandb.mode}, project {cfg.train.wandb.project} ({run_dir / 'wandb'})"
    summary.update(step=step, final_loss=loss if step > summary["start_step"] else None, best=best,
                   adapters=best_dir or str(run_dir / "adapters"), best_adapters=best_dir,
                   last_adapters=str(run_dir / "adapters"), no_best_reason=None if best_dir else
                   no_best_reason(cfg, val_rows is not None), metrics=str(run_dir / "metrics.jsonl"), views=views,
                   wall_time_s=time.perf_counter() - started)
    if is_writer:
        print(format_summary(summary))
    return summary
