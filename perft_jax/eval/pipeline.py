"""`mode=eval` (`perft-eval`): a base model (+ adapters) on LLM-Adapters benchmarks, accuracies printed and saved.

Into `train.output_dir`: `eval.json` (accuracies and every generation), `eval_config.json` (the resolved config
that ran; the run's `config.json` stays the training record), and the accuracies as metrics (`metrics.jsonl`,
TensorBoard and W&B as the `train.*` switches say) at the step the adapters were trained to.
"""
from __future__ import annotations

import contextlib
import os
import pathlib

import jax

from perft_jax.build import build_model, load_base_tokenizer
from perft_jax.config import Config
from perft_jax.distributed import initialize, is_main_process
from perft_jax.errors import UserError
from perft_jax.eval.runner import evaluate
from perft_jax.io import write_text_atomic
from perft_jax.perft.adapter_configs import read_adapter_config, read_metadata
from perft_jax.perft.adapter_files import load_adapters
from perft_jax.sharding import run_sharding
from perft_jax.train.metrics import MetricsWriter

EVAL_CONFIG = "eval_config.json"


def run_evaluation(cfg: Config) -> dict:
    """Evaluate `cfg.model` (+ `cfg.eval.adapters`) on `cfg.eval.benchmarks`; on the mesh of `cfg.mesh` when there
    are several devices (or processes): base restored onto the mesh, prompts split over the batch axes."""
    if not cfg.eval.benchmarks:
        raise UserError("eval.benchmarks: name at least one benchmark, e.g. eval.benchmarks=[boolq,piqa]")
    initialize(cfg.mesh.distributed)  # multi-host: before anything touches a device
    sharding = run_sharding(cfg.mesh)
    with jax.set_mesh(sharding.mesh) if sharding is not None else contextlib.nullcontext():
        return _run_evaluation(cfg, sharding)


def adapter_step(adapter_dir: str | os.PathLike) -> int:
    """The training step recorded with an adapter directory by the training loop (0 when none is)."""
    _, meta = read_metadata(pathlib.Path(adapter_dir))
    step = (meta or {}).get("step", 0)
    return step if isinstance(step, int) and not isinstance(step, bool) else 0


def log_eval_metrics(cfg: Config, result: dict, step: int) -> None:
    """The accuracies of `evaluate`'s result as the run's metrics at `step`: `eval/accuracy/<benchmark>` and
    `eval/macro_average` in `metrics.jsonl`, TensorBoard (`train.tensorboard`) and W&B (`train.wandb`)."""
    scalars = {f"accuracy/{name}": value for name, value in result["accuracy"].items()}
    scalars["macro_average"] = result["macro_average"]
    with MetricsWriter(cfg.train.output_dir, is_writer=is_main_process(), tensorboard=cfg.train.tensorboard,
                       wandb=cfg.train.wandb) as writer:
        writer.write(step, scalars, split="eval")


def _write_config(cfg: Config, out_dir: pathlib.Path) -> None:
    write_text_atomic(out_dir / EVAL_CONFIG, cfg.to_json() + "\n")


def _run_evaluation(cfg: Config, sharding) -> dict:
    # Checked before the base is read: the tokenizer (and its fit to the base's vocabulary), the adapters' config.
    tokenizer = load_base_tokenizer(cfg.model)
    if cfg.eval.adapters:
        read_adapter_config(cfg.eval.adapters)
    model = build_model(cfg.model, None, sharding, expert_dispatch=cfg.mesh.expert_dispatch)
    step = 0
    if cfg.eval.adapters:
        load_adapters(model, cfg.eval.adapters)  # attached where the base says, as build_model would
        step = adapter_step(cfg.eval.adapters)
    out_dir = pathlib.Path(cfg.train.output_dir)  # created by the first file written, after every input was read
    result = evaluate(model, tokenizer, list(cfg.eval.benchmarks), cfg.eval.data_dir,
                      out_dir / "eval.json", cfg.eval.batch_size,
                      max_examples=cfg.eval.max_examples or None, num_beams=cfg.eval.num_beams,
                      max_new_tokens=cfg.eval.max_new_tokens or None)
    log_eval_metrics(cfg, result, step)
    if is_main_process():
        _write_config(cfg, out_dir)
        width = max(len(name) for name in cfg.eval.benchmarks)
        for name in cfg.eval.benchmarks:
            print(f"{name:<{width}}  {100 * result['accuracy'][name]:6.2f} %")
        print(f"{'average':<{width}}  {100 * result['macro_average']:6.2f} %   ({out_dir / 'eval.json'}; "
              f"adapters: {cfg.eval.adapters or 'none, the base alone'}, step {step})")
    return result
