"""The benchmark suite's one entry point (issue 6).

    python -m benchmarks.run [--suite cpu|gpu] [--out results.json]
                             [--only train,scaling,dispatch,generation,converter,flops,real]
                             [--repeats N]

Sections, each a module with `run(args) -> dict` (a "tables" entry of markdown tables is printed):
- train:     perft-jax train step against HF PyTorch, MFU (benchmarks/train_step.py)
- scaling:   step time vs adapter experts M, sequence length, MoE backend (benchmarks/scaling.py)
- dispatch:  one MoE layer, forward + backward, per backend (benchmarks/moe_dispatch.py)
- generation: greedy and 4-beam `generate` against HF generate (PyTorch eager), outputs equal token for token,
             and the evaluation runner end to end on a real benchmark file (benchmarks/generation.py; its
             options `--gen-batch`, `--gen-new-tokens`, `--gen-eval-examples`, `--gen-torch-threads`)
- converter: HF -> perft-jax conversion memory and throughput (benchmarks/converter.py, when present; it may
             add its own options through `add_arguments(parser)`)
- flops:     matmul FLOPs of the exported cuda/tpu train step against the useful count, per MoE backend
             (benchmarks/flops.py; no device needed)
- real:      OLMoE-1B-7B at full size and Mixtral-8x7B's width: generate, convert, train, evaluate, peak RSS
             per stage against the base (benchmarks/real.py; only when named: it needs about 30 GB of disk)

Within a section every comparison is measured side by side in this process: warm-up, then interleaved rounds,
median reported. The JSON holds the environment (device, versions, load average) and every raw timing.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from typing import Any

from benchmarks.common import device_line, environment, markdown_table, write_json

SECTIONS = ("train", "scaling", "dispatch", "generation", "converter", "flops", "real")
MODULES = {"train": "benchmarks.train_step", "scaling": "benchmarks.scaling", "dispatch": "benchmarks.moe_dispatch",
           "generation": "benchmarks.generation", "converter": "benchmarks.converter", "flops": "benchmarks.flops",
           "real": "benchmarks.real"}
DEFAULT_SECTIONS = SECTIONS[:-1]  # `real` writes and trains ~28 GB of checkpoints: asked for by name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: bench-small against PyTorch; gpu: OLMoE-1B-7B shapes, bf16, no PyTorch")
    p.add_argument("--out", default="results.json", help="JSON results path (written atomically)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but real)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per comparison (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per contender first (the first compiles)")
    p.add_argument("--config", default=None,
                   help="train-step and generation config (default: bench-small, gpu: olmoe-1b-7b)")
    p.add_argument("--f32-backends", default="dense,capacity,grouped,ragged",
                   help="MoE backends timed in float32 (train)")
    p.add_argument("--bf16-backends", default="capacity,grouped", help="MoE backends also timed in bfloat16 (train)")
    p.add_argument("--torch-bf16", action="store_true", help="also time PyTorch in bfloat16 (train)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="capacity backend factor (default: the smallest that drops nothing on the bench batch)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n^3 matmul that measures the peak")
    # benchmarks that bring their own options
    for name in ("benchmarks.generation", "benchmarks.converter", "benchmarks.flops", "benchmarks.real"):
        if importlib.util.find_spec(name) is not None:
            module = importlib.import_module(name)
            if hasattr(module, "add_arguments"):
                module.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.config = args.config or ("bench-small" if args.suite == "cpu" else "olmoe-1b-7b")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        print(f"--only: unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)})", file=sys.stderr)
        return 2
    start = time.perf_counter()
    env = environment()
    print(device_line(env), flush=True)
    results: dict[str, Any] = {"environment": env, "args": vars(args)}
    for section in only:
        if importlib.util.find_spec(MODULES[section]) is None:
            print(f"\n## {section}: skipped ({MODULES[section].replace('.', '/')}.py not present)", flush=True)
            results[section] = {"skipped": "module not present"}
            continue
        section_start = time.perf_counter()
        out = importlib.import_module(MODULES[section]).run(args)
        out["wall_s"] = time.perf_counter() - section_start
        results[section] = out
        for title, table in out.get("tables", {}).items():
            print(f"\n## {title}\n\n{table}", flush=True)
        print(f"\n({section}: {out['wall_s']:.0f} s)", flush=True)
        write_json(args.out, results)  # after every section: a later failure keeps the earlier numbers
    rows = [row for section in only for row in results[section].get("targets", ())]
    if rows:  # every section's targets (issue 16), met or not, in one table at the end
        print("\n## Targets\n\n" + markdown_table(
            [{**row, "status": {True: "met", False: "**not met**", None: "–"}[row["met"]]} for row in rows],
            [("target", "target", "s"), ("measured", "measured", "s"), ("status", "status", "s")]), flush=True)
    env["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - start
    write_json(args.out, results)
    print(f"\nwall time {results['wall_s']:.0f} s; load average at end {env['loadavg_end'][0]:.2f}; "
          f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
