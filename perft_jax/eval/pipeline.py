"""`train.py mode=eval`: a base model (+ adapters) on LLM-Adapters benchmarks, accuracies printed and saved."""
from __future__ import annotations

import contextlib
import pathlib

import jax

from perft_jax.build import build_model
from perft_jax.config import Config
from perft_jax.data.tokenize import load_tokenizer
from perft_jax.distributed import initialize, is_main_process
from perft_jax.errors import UserError
from perft_jax.eval.runner import evaluate
from perft_jax.perft.adapter_files import load_adapters
from perft_jax.sharding import run_sharding


def run_evaluation(cfg: Config) -> dict:
    """Evaluate `cfg.model` (+ `cfg.eval.adapters`) on `cfg.eval.benchmarks`; on the mesh of `cfg.mesh` when there
    are several devices (or processes): base restored onto the mesh, prompts split over the batch axes."""
    if not cfg.eval.benchmarks:
        raise UserError("eval.benchmarks: name at least one benchmark, e.g. eval.benchmarks=[boolq,piqa]")
    initialize(cfg.mesh.distributed)  # multi-host: before anything touches a device
    sharding = run_sharding(cfg.mesh)
    with jax.set_mesh(sharding.mesh) if sharding is not None else contextlib.nullcontext():
        return _run_evaluation(cfg, sharding)


def _run_evaluation(cfg: Config, sharding) -> dict:
    model = build_model(cfg.model, None, sharding, expert_dispatch=cfg.mesh.expert_dispatch)
    if cfg.eval.adapters:
        load_adapters(model, cfg.eval.adapters)  # attached where the base says, as build_model would
    tokenizer_path = cfg.model.tokenizer or cfg.model.checkpoint
    if not tokenizer_path:
        raise UserError("model.tokenizer: needed when the base comes from model.hf_config")
    out_dir = pathlib.Path(cfg.train.output_dir)
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate(model, load_tokenizer(tokenizer_path), list(cfg.eval.benchmarks), cfg.eval.data_dir,
                      out_dir / "eval.json", cfg.eval.batch_size,
                      max_examples=cfg.eval.max_examples or None, num_beams=cfg.eval.num_beams,
                      max_new_tokens=cfg.eval.max_new_tokens or None)
    if is_main_process():
        width = max(len(name) for name in cfg.eval.benchmarks)
        for name in cfg.eval.benchmarks:
            print(f"{name:<{width}}  {100 * result['accuracy'][name]:6.2f} %")
        print(f"{'average':<{width}}  {100 * result['macro_average']:6.2f} %   ({out_dir / 'eval.json'})")
    return result
