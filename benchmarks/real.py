"""Real-size benchmark (issue 11): OLMoE-1B-7B converts, fine-tunes and evaluates on one 24 GB host.

    python -m benchmarks.run --only real [--real-models olmoe,mixtral] [--real-steps 3] [--real-workdir DIR]
    python -m benchmarks.real [--models olmoe] [--olmoe-layers 2] [--reference-src OLD_TREE] [--out FILE]

For each model — OLMoE-1B-7B at its full 16 layers, and Mixtral-8x7B's width at `--mixtral-layers` of its 32
(4 by default: what this machine's disk and memory hold beside the rest) — four stages, each its own process,
whose peak RSS is that process's own `ru_maxrss` (benchmarks/converter.py `measure`):

1. generate: a random bfloat16 Hugging Face checkpoint of the real shapes (per-expert hub layout, 1 GB shards)
   streamed to disk from one 64 MB pool, never held in memory, with the demo's byte-level BPE tokenizer beside
   it, and a small commonsense-format task (training rows and a held-out test file);
2. convert: `python -m perft_jax.convert.cli --dtype bfloat16`;
3. train: `train.py --config configs/train/<model>-perft-r.yaml`, the shipped paper config (PERFT-R Top2/8,
   D_B 32, bfloat16 base, float32 adapters), pointed at that checkpoint and data, at batch 2, cutoff 128, for
   `--steps` steps with one validation at the end, on the `grouped` MoE backend (the shipped configs inherit
   the converted checkpoint's `dense`, which runs all 64 experts on every token);
4. eval: `train.py ... mode=eval` with the trained adapters: a few prompts, 4-beam search.

Targets: peak RSS while training and while evaluating at most the base's bytes + 3 GiB. With `--reference-src`
(e.g. `git worktree add /tmp/before <commit>`), the train and eval stages also run with that tree's code on the
same checkpoint, side by side: a before/after comparison. For Mixtral the per-layer figures are scaled to 32.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

from benchmarks.common import standalone_main
from benchmarks.converter import GB, GIB, REPO, measure

MODELS = {"olmoe": ("olmoe-1b-7b", 16), "mixtral": ("mixtral-8x7b", 32)}  # config name, full depth
TARGET_OVERHEAD = 3 * GIB
SHARD_BYTES = 1.0 * GB
TASK = "synthetic_compare"

# The source checkpoint, tokenizer and task, written by a child process (so its own peak RSS is measured).
GENERATE = """
import json, pathlib, sys
import numpy as np
from benchmarks.converter import generate_checkpoint
from perft_jax.data.prompts import train_prompt
from perft_jax.demo import build_tokenizer, make_rows
hf_dir, data_dir, config, layers = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
summary = generate_checkpoint(hf_dir, layers, float(sys.argv[5]), config_path=pathlib.Path(config))
rng = np.random.default_rng(0)
train, test = make_rows(rng, 64), make_rows(rng, 8)
build_tokenizer([train_prompt(r["instruction"], r["output"]) for r in train], hf_dir)
(data_dir / "eval" / "%s").mkdir(parents=True, exist_ok=True)
(data_dir / "train.json").write_text(json.dumps(train))
(data_dir / "eval" / "%s" / "test.json").write_text(json.dumps(test))
(hf_dir / "bench_summary.json").write_text(json.dumps(summary))
""" % (TASK, TASK)


def _log(msg: str) -> None:
    print(f"[real] {msg}", file=sys.stderr, flush=True)


def _du(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _step_times(run_dir: pathlib.Path) -> list[float]:
    """Seconds of each logged train step (`log_every_steps=1`): tokens / tokens per second."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["num_tokens"] / r["tokens_per_s"] for r in rows if r["split"] == "train"]


def _stages(name: str, layers: int, args: argparse.Namespace, work: pathlib.Path) -> dict[str, Any]:
    config_name, _ = MODELS[name]
    hf_dir, ckpt, data_dir = work / "hf", work / "ckpt", work / "data"
    py = sys.executable
    out: dict[str, Any] = {"model": config_name, "layers": layers}
    summary_path = hf_dir / "bench_summary.json"
    if summary_path.is_file() and json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"] == layers:
        _log(f"{name}: reusing {hf_dir}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        _log(f"{name}: writing a {layers}-layer random checkpoint to {hf_dir}")
        out["generate"] = measure([py, "-c", GENERATE, str(hf_dir), str(data_dir),
                                   str(REPO / "configs" / "hf" / f"{config_name}.json"), str(layers),
                                   str(SHARD_BYTES)])
    out["checkpoint"] = json.loads(summary_path.read_text())
    if not (ckpt / "perft_model.json").is_file():
        _log(f"{name}: converting")
        out["convert"] = measure([py, "-m", "perft_jax.convert.cli", "--hf-dir", str(hf_dir), "--out", str(ckpt),
                                  "--dtype", "bfloat16", "--no-progress", "--overwrite"])
    out["base_bytes"] = out["checkpoint"]["total_bytes"]  # the bfloat16 parameters, as they sit in memory
    out["converted_disk_bytes"] = _du(ckpt / "params")  # orbax compresses: random weights shrink on disk
    trees = {"after": REPO}
    if args.real_reference_src is not None:
        trees = {"before": pathlib.Path(args.real_reference_src).absolute(), **trees}
    for label, tree in trees.items():
        env = {**os.environ, "PYTHONPATH": str(tree)}
        run_dir, eval_dir = work / f"run-{label}", work / f"eval-{label}"
        shutil.rmtree(run_dir, ignore_errors=True)
        config = REPO / "configs" / "train" / f"{config_name}-perft-r.yaml"
        common = [py, str(tree / "train.py"), "--config", str(config), f"model.checkpoint={ckpt}",
                  "model.moe_backend=grouped", "train.progress_bar=false", "train.tensorboard=false"]
        train = common + [f"data.train_files=[{data_dir / 'train.json'}]", "data.batch_size=2",
                          "data.cutoff_len=128", "data.length_buckets=[128]", "data.val_set_size=4",
                          f"train.max_steps={args.real_steps}", f"train.eval_every_steps={args.real_steps}",
                          "train.log_every_steps=1", f"checkpoint.every_steps={args.real_steps}",
                          f"train.output_dir={run_dir}"]
        _log(f"{name} ({label}): training {args.real_steps} steps")
        out[f"train_{label}"] = _measured(train, tree, env, work / f"train-{label}.out")
        if "failed" in out[f"train_{label}"]:
            continue
        out[f"train_{label}"]["step_s"] = _step_times(run_dir)
        evaluate = common + ["mode=eval", f"eval.adapters={run_dir / 'adapters'}", f"eval.benchmarks=[{TASK}]",
                             f"eval.data_dir={data_dir / 'eval'}", f"eval.max_examples={args.real_prompts}",
                             "eval.num_beams=4", "eval.batch_size=2", f"train.output_dir={eval_dir}"]
        _log(f"{name} ({label}): evaluating {args.real_prompts} prompts, 4 beams")
        out[f"eval_{label}"] = _measured(evaluate, tree, env, work / f"eval-{label}.out")
    return out


def _measured(cmd: list[str], tree: pathlib.Path, env: dict, stdout: pathlib.Path) -> dict:
    """`measure`, with a failure recorded (the reference tree may run out of memory) instead of raised."""
    try:
        return measure(cmd, cwd=tree, env=env, stdout=stdout)
    except RuntimeError as e:
        _log(f"failed: {str(e)[-400:]}")
        return {"failed": str(e)[-2000:]}


def _rows(result: dict) -> list[str]:
    base = result["base_bytes"]
    rows = []
    for stage in ("generate", "convert", "train_before", "train_after", "eval_before", "eval_after"):
        r = result.get(stage)
        if r is None:
            continue
        label = stage.replace("_", " (") + ")" if "_" in stage else stage
        if "failed" in r:
            lines = [line for line in r["failed"].strip().splitlines() if "Error" in line] or ["failed"]
            reason = "killed by the kernel: out of memory" if "exited -9" in r["failed"] else lines[-1][:120]
            rows.append(f"| {label} | failed | – | – | {reason} |")
            continue
        extra = ""
        if "step_s" in r:
            steps = r["step_s"]
            extra = f"first step {steps[0]:.1f} s, then {sorted(steps[1:])[len(steps[1:]) // 2]:.1f} s/step" \
                if len(steps) > 1 else f"one step {steps[0]:.1f} s"
        peak = r["peak_rss_bytes"]
        target = ""
        if stage.startswith(("train", "eval")):
            met = peak <= base + TARGET_OVERHEAD
            target = f"{'met' if met else 'NOT met'} ({(peak - base) / GIB:+.2f} GiB over the base)"
            extra = f"{extra}; {target}" if extra else target
        rows.append(f"| {label} | {r['wall_s']:.0f} | {peak / GIB:.2f} | {peak / base:.2f} | {extra} |")
    return rows


def _table(result: dict) -> str:
    ck, base = result["checkpoint"], result["base_bytes"]
    lines = ["| stage | wall s | peak RSS GiB | peak / base | notes |", "|---|---:|---:|---:|---|"]
    lines += _rows(result)
    lines += ["", f"- source: {ck['total_bytes'] / GB:.2f} GB bfloat16 in {ck['shards']} shards ({ck['tensors']} "
                  f"tensors) = the base in memory, {base / GIB:.2f} GiB ({result['converted_disk_bytes'] / GB:.2f} "
                  f"GB on disk once converted); target peak RSS "
                  f"<= base + 3 GiB = {(base + TARGET_OVERHEAD) / GIB:.2f} GiB"]
    full = MODELS[result["model"].split("-")[0]][1]
    if result["layers"] < full and "train_after" in result and "step_s" in result["train_after"]:
        per_layer = (ck["total_bytes"] - ck["fixed_bytes"]) / result["layers"]
        steps = result["train_after"]["step_s"]
        steady = sorted(steps[1:])[len(steps[1:]) // 2] if len(steps) > 1 else steps[0]
        lines.append(f"- scaled to {full} layers: base {(ck['fixed_bytes'] + full * per_layer) / GB:.1f} GB "
                     f"({per_layer / GB:.2f} GB a layer); a train step about {steady * full / result['layers']:.0f} s "
                     f"on this CPU (step time scaled by depth)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "--real-") -> argparse.ArgumentParser:
    g = parser.add_argument_group("real-size benchmark")
    g.add_argument(f"{prefix}models", dest="real_models", default="olmoe,mixtral", help="olmoe and/or mixtral")
    g.add_argument(f"{prefix}olmoe-layers", dest="real_olmoe_layers", type=int, default=16)
    g.add_argument(f"{prefix}mixtral-layers", dest="real_mixtral_layers", type=int, default=4)
    g.add_argument(f"{prefix}steps", dest="real_steps", type=int, default=3, help="train steps")
    g.add_argument(f"{prefix}prompts", dest="real_prompts", type=int, default=4, help="prompts evaluated")
    g.add_argument(f"{prefix}workdir", dest="real_workdir", type=pathlib.Path,
                   help="keep the checkpoints here (and reuse them); default: a temporary folder per model")
    g.add_argument(f"{prefix}reference-src", dest="real_reference_src", type=pathlib.Path,
                   help="also train and evaluate with this source tree (before/after)")
    return parser


def run(args: argparse.Namespace) -> dict:
    results: dict[str, Any] = {"loadavg_before": [round(x, 2) for x in os.getloadavg()],
                               "date": time.strftime("%Y-%m-%d %H:%M"), "tables": {}}
    for name in [m.strip() for m in args.real_models.split(",") if m.strip()]:
        if name not in MODELS:
            raise SystemExit(f"--real-models: unknown model {name!r} (choose from {', '.join(MODELS)})")
        layers = getattr(args, f"real_{name}_layers")
        if args.real_workdir is not None:
            result = _stages(name, layers, args, pathlib.Path(args.real_workdir).absolute() / name)
        else:
            with tempfile.TemporaryDirectory(prefix=f"perft-real-{name}-") as tmp:
                result = _stages(name, layers, args, pathlib.Path(tmp))
        results[name] = result
        title = f"real size: {result['model']}, {layers} of {MODELS[name][1]} layers, PERFT-R Top2/8 D_B 32, bf16"
        results["tables"][title] = _table(result)
        _log(f"{name}: done\n{results['tables'][title]}")
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main(argv: list[str] | None = None) -> int:
    return standalone_main(__doc__, "python -m benchmarks.real", add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
