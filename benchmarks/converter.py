"""Converter benchmark (issue 6, item 4): peak memory and throughput of HF -> perft-jax conversion.

    python -m benchmarks.converter [--layers 4] [--shard-gb 1.0] [--workdir DIR] [--repeats 3] [--out FILE]
                                   [--reference-src OLD_TREE]
    (inside the suite: python -m benchmarks.run --only converter --converter-layers 4 ...)

1. Writes a random OLMoE-shaped Hugging Face checkpoint to disk: the real OLMoE-1B-7B per-layer shapes
   (configs/hf/olmoe-1b-7b.json: hidden 2048, intermediate 1024, 64 experts, vocab 50304), `--layers`
   layers (4 -> 3.77 GB in bfloat16), per-expert hub layout, split into `--shard-gb` safetensors shards
   with a `model.safetensors.index.json`. Tensors are streamed to disk from one 64 MB random pool, so the
   generator holds no state dict. With `--workdir` the checkpoint is kept and reused.
2. Reads every shard once so the page cache is warm for everything timed after (dropping the cache needs
   root); all timings are warm-cache figures, and each conversion is preceded by another warming read.
3. Measures, each in its own subprocess (peak RSS = the child's `ru_maxrss`, from `os.wait4`):
   - baseline: a python that imports the converter stack (jax, orbax, perft_jax.convert) and reads the
     config with transformers -- which imports torch when it is installed -- then starts the CPU backend:
     the fixed overhead inside every conversion's peak; again with torch hidden;
   - raw read: the shards read sequentially into one 64 MB buffer;
   - safetensors read: every tensor through `safe_open(framework="np").get_tensor`, each page touched;
   - raw copy: the shards read and written to the work dir, fsync'ed (the converter must write too);
   - convert: `python -m perft_jax.convert.cli --hf-dir ... --out ...`; again with torch hidden; and, with
     `--reference-src`, the converter of another source tree (before/after).
   `--repeats` rounds each run every measurement once (interleaved, so that load changes on a shared
   machine hit all alike): median wall time, largest peak RSS.
4. Reports peak RSS against the target of issue 6 (2 x largest tensor + 1 GiB) and conversion throughput
   (source bytes / wall time, start-up included) against the plain reads and the copy.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import ml_dtypes
import numpy as np

from benchmarks.common import standalone_main

REPO = pathlib.Path(__file__).resolve().parent.parent
OLMOE_CONFIG = REPO / "configs" / "hf" / "olmoe-1b-7b.json"
GB = 1e9
GIB = 1024**3
POOL_BYTES = 64 * 1024**2

# ---- the random checkpoint -------------------------------------------------------------------------


def _tensor_specs(config_path: pathlib.Path) -> list[tuple[str, tuple[int, ...]]]:
    """(HF key, HF shape) of every tensor, in `save_pretrained` order, from the converter's own key map."""
    from perft_jax.convert import hf_keys
    from perft_jax.models.hf_config import read_hf_config_file

    cfg, arch, _ = read_hf_config_file(config_path)
    return [(key, shape) for _, maps in hf_keys.group_plan(cfg, arch) for tmap in maps
            for key, shape in zip(tmap.hf_keys, hf_keys.hf_shapes(tmap))]


def _write_shard(path: pathlib.Path, specs: list[tuple[str, tuple[int, ...]]], pool: memoryview, seed: int) -> None:
    """A safetensors file written by hand (8-byte header length, JSON header, raw bytes), tensor by tensor."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in specs:
        nbytes = int(np.prod(shape)) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key, shape in specs:
            left = int(np.prod(shape)) * 2
            start = int(rng.integers(0, len(pool) // 2)) * 2  # bf16-aligned, different for every tensor
            while left:
                piece = pool[start:start + left]
                f.write(piece)
                left -= len(piece)
                start = 0


def generate_checkpoint(out_dir: pathlib.Path, layers: int, shard_bytes: float, seed: int = 0,
                        config_path: pathlib.Path = OLMOE_CONFIG) -> dict:
    """Write config.json (`config_path`'s architecture at `layers` layers), `model-0000i-of-0000n.safetensors`
    shards and the index; return a summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads(pathlib.Path(config_path).read_text())
    config["num_hidden_layers"] = layers
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    specs = _tensor_specs(out_dir / "config.json")
    shards, current, size = [], [], 0
    for key, shape in specs:
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    shards.append(current)
    values = np.random.default_rng(seed).normal(0.0, 0.02, POOL_BYTES // 2).astype(ml_dtypes.bfloat16)
    pool = memoryview(values.view(np.uint8))
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out_dir / name, shard, pool, seed + i + 1)
        weight_map.update({key: name for key, _ in shard})
    total = sum(int(np.prod(s)) * 2 for _, s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    largest_key, largest_shape = max(specs, key=lambda ks: int(np.prod(ks[1])))
    fixed = sum(int(np.prod(s)) * 2 for k, s in specs if ".layers." not in k)  # embeddings, final norm, LM head
    return {"total_bytes": total, "fixed_bytes": fixed, "tensors": len(specs), "shards": len(shards),
            "largest_tensor": largest_key, "largest_tensor_shape": list(largest_shape),
            "largest_tensor_bytes": int(np.prod(largest_shape)) * 2}


# ---- measured children -------------------------------------------------------------------------------

RAW_READ = """
import sys
buf = bytearray(64 * 1024**2); view = memoryview(buf)
for path in sys.argv[1:]:
    with open(path, 'rb', buffering=0) as f:
        while f.readinto(view):
            pass
"""

RAW_COPY = """
import os, pathlib, sys
buf = bytearray(64 * 1024**2); view = memoryview(buf)
out_dir = pathlib.Path(sys.argv[1]); out_dir.mkdir()
for path in sys.argv[2:]:
    with open(path, 'rb', buffering=0) as f, open(out_dir / pathlib.Path(path).name, 'wb', buffering=0) as g:
        while n := f.readinto(view):
            g.write(view[:n])
        os.fsync(g.fileno())
"""

SAFETENSORS_READ = """
import sys
import ml_dtypes  # registers bfloat16 for safe_open(framework='np')
import numpy as np
from safetensors import safe_open
for path in sys.argv[1:]:
    with safe_open(path, framework='np') as f:
        for key in f.keys():
            t = f.get_tensor(key)
            t.reshape(-1).view(np.uint8)[::4096].sum()  # touch every page
            del t
"""

HIDE_TORCH = "import sys; sys.modules['torch'] = None\n"  # as if torch were not installed

BASELINE = """
import pathlib, sys
import jax.numpy as jnp
import orbax.checkpoint  # noqa: F401
import perft_jax.convert.hf_to_jax  # noqa: F401
from perft_jax.models.hf_config import read_hf_config_file
read_hf_config_file(pathlib.Path(sys.argv[1]))  # transformers' config classes (they import torch if present)
jnp.zeros(8).block_until_ready()
"""

CONVERT = "import sys\nfrom perft_jax.convert.cli import main\nsys.exit(main(sys.argv[1:]))\n"


# Linux counts the memory a child inherits at fork, before exec, in its ru_maxrss: a child forked from
# this (large) process would report at least this process's size. A small python in between forks the
# measured command and reports its rusage.
MEASURE = """
import json, os, subprocess, sys
out = open(sys.argv[2], 'wb') if sys.argv[2] != '-' else subprocess.DEVNULL
proc = subprocess.Popen(sys.argv[3:], stdout=out)
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], 'w') as f:
    json.dump({'rc': os.waitstatus_to_exitcode(status), 'maxrss_kb': usage.ru_maxrss}, f)
"""


def measure(cmd: list[str], cwd: pathlib.Path = REPO, env: dict | None = None,
            stdout: pathlib.Path | None = None) -> dict:
    """Run `cmd` to completion; its wall time and its own peak RSS (`ru_maxrss` of `os.wait4`). Its standard
    output goes to `stdout` when given (else nowhere); its standard error is quoted if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        report, err_path = pathlib.Path(tmp) / "rusage.json", pathlib.Path(tmp) / "stderr"
        with open(err_path, "wb") as err:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", MEASURE, str(report), str(stdout or "-"), *cmd], stderr=err,
                           cwd=cwd, env=env, check=True)
            wall = time.perf_counter() - start
        usage = json.loads(report.read_text())
        if usage["rc"] != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])}... exited {usage['rc']}: {err_path.read_text()[-2000:]}")
    return {"wall_s": wall, "peak_rss_bytes": usage["maxrss_kb"] * 1024}


def _interleaved(contenders: dict[str, tuple[list[str], dict, Any]], repeats: int) -> dict[str, dict]:
    """`repeats` rounds, each running every contender once (its `before` hook first), so that a change in
    the machine's load during the run affects all of them alike; median wall time, largest peak RSS."""
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for round_ in range(repeats):
        for name, (cmd, kwargs, before) in contenders.items():
            if before is not None:
                before()
            runs[name].append(measure(cmd, **kwargs))
            _log(f"round {round_ + 1}/{repeats} {name}: {runs[name][-1]['wall_s']:.2f} s, "
                 f"{runs[name][-1]['peak_rss_bytes'] / GIB:.3f} GiB")
    return {name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                   "wall_s_all": [round(r["wall_s"], 3) for r in rs],
                   "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs)} for name, rs in runs.items()}


def _warm(files: list[pathlib.Path]) -> None:
    subprocess.run([sys.executable, "-c", RAW_READ, *map(str, files)], check=True)


def _du(path: pathlib.Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


# ---- entry points ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "--converter-") -> argparse.ArgumentParser:
    """The benchmark's options, as `--converter-layers` etc. inside the suite (`benchmarks.run`), so they
    cannot collide with other benchmarks' flags; `python -m benchmarks.converter` uses plain `--layers`."""
    g = parser.add_argument_group("converter benchmark")
    g.add_argument(f"{prefix}layers", dest="converter_layers", type=int, default=4,
                   help="OLMoE layers in the random checkpoint (4: about 3.8 GB in bfloat16)")
    g.add_argument(f"{prefix}shard-gb", dest="converter_shard_gb", type=float, default=1.0,
                   help="safetensors shard size of the random checkpoint, GB")
    g.add_argument(f"{prefix}workdir", dest="converter_workdir", type=pathlib.Path,
                   help="where to write the checkpoints (kept, and the HF one reused); default: a temp dir")
    g.add_argument(f"{prefix}repeats", dest="converter_repeats", type=int, default=3,
                   help="timed runs of each measurement (median wall time, largest peak RSS)")
    g.add_argument(f"{prefix}reference-src", dest="converter_reference_src", type=pathlib.Path,
                   help="also convert with the converter of this source tree (e.g. `git archive` of an older "
                        "commit), interleaved with this tree's runs: a before/after comparison")
    return parser


ROWS = [("baseline", "import converter stack + read config"), ("baseline_no_torch", "same, torch hidden"),
        ("raw_read", "raw read of the shards"), ("safetensors_read", "safetensors get_tensor, every tensor"),
        ("raw_copy", "raw copy of the shards + fsync"), ("convert", "**convert** (CLI subprocess)"),
        ("convert_no_torch", "convert, torch hidden"),
        ("convert_reference", "convert, reference tree (`--reference-src`)")]


def _tables(results: dict) -> dict[str, str]:
    """The results as markdown, keyed by title (the suite, benchmarks/run.py, prints them)."""
    ck, t = results["checkpoint"], results["target"]
    lines = ["| measurement | wall s | GB/s | peak RSS GiB |", "|---|---:|---:|---:|"]
    for name, label in ROWS:
        if name not in results:
            continue
        r = results[name]
        rate = f"{r['gb_per_s']:.3f}" if "gb_per_s" in r else "–"
        lines.append(f"| {label} | {r['wall_s']:.2f} | {rate} | {r['peak_rss_bytes'] / GIB:.3f} |")
    lines += [
        "",
        f"- checkpoint: {ck['total_bytes'] / GB:.2f} GB bfloat16 in {ck['shards']} shards, {ck['tensors']} tensors; "
        f"largest `{ck['largest_tensor']}` {ck['largest_tensor_shape']} = {ck['largest_tensor_bytes'] / GIB:.3f} GiB; "
        f"converted checkpoint {results['converted_bytes'] / GB:.2f} GB on disk",
        f"- target peak RSS <= 2 x largest + 1 GiB = {t['peak_rss_bytes'] / GIB:.3f} GiB: convert "
        f"{results['convert']['peak_rss_bytes'] / GIB:.3f} GiB, **{'met' if t['met'] else 'NOT met'}** "
        f"({t['convert_above_baseline_bytes'] / GIB:.3f} GiB above its import baseline)",
        f"- convert throughput = {t['convert_vs_safetensors_read']:.3f} x safetensors read, "
        f"{t['convert_vs_raw_read']:.3f} x raw read, {t['convert_vs_raw_copy']:.3f} x raw copy "
        "(warm page cache; wall time includes start-up)",
        f"- load average before / after: {results['loadavg_before']} / {results['loadavg_after']}",
    ]
    if "convert_reference" in results:
        ref, new = results["convert_reference"], results["convert"]
        lines.insert(-1, f"- against the reference tree ({results['reference_src']}): peak RSS "
                         f"{ref['peak_rss_bytes'] / GIB:.3f} -> {new['peak_rss_bytes'] / GIB:.3f} GiB, wall time "
                         f"{ref['wall_s']:.1f} -> {new['wall_s']:.1f} s ({ref['wall_s'] / new['wall_s']:.2f}x)")
    title = f"converter: {ck['generated_with'][0]}-layer OLMoE-shaped checkpoint ({results['machine']})"
    return {title: "\n".join(lines)}


def _log(msg: str) -> None:
    print(f"[converter] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    """Generate, warm, measure; return JSON-able results, markdown under "tables"."""
    tmp = None
    workdir = args.converter_workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="perft-converter-bench-")
        workdir = pathlib.Path(tmp.name)
    try:
        return _run(args, pathlib.Path(workdir).absolute())
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(args: argparse.Namespace, workdir: pathlib.Path) -> dict:
    hf_dir, out_dir, copy_dir = workdir / "hf", workdir / "ckpt", workdir / "copy"
    summary_path = hf_dir / "bench_summary.json"
    generated_with = [args.converter_layers, args.converter_shard_gb]
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("generated_with") == generated_with:
        checkpoint = json.loads(summary_path.read_text())
    else:
        shutil.rmtree(hf_dir, ignore_errors=True)
        _log(f"writing a {args.converter_layers}-layer random OLMoE checkpoint to {hf_dir}")
        start = time.perf_counter()
        checkpoint = generate_checkpoint(hf_dir, args.converter_layers, args.converter_shard_gb * GB)
        checkpoint.update(generated_with=generated_with, generate_s=time.perf_counter() - start)
        summary_path.write_text(json.dumps(checkpoint))
    files = sorted(hf_dir.glob("model-*.safetensors"))
    _warm(files)
    py, repeats = sys.executable, args.converter_repeats
    convert_args = ["--hf-dir", str(hf_dir), "--out", str(out_dir), "--no-progress", "--overwrite"]
    config = str(hf_dir / "config.json")

    def fresh_output():  # every conversion starts from an empty output and a warm source
        shutil.rmtree(out_dir, ignore_errors=True)
        _warm(files)

    contenders = {
        "baseline": ([py, "-c", BASELINE, config], {}, None),
        "baseline_no_torch": ([py, "-c", HIDE_TORCH + BASELINE, config], {}, None),
        "raw_read": ([py, "-c", RAW_READ, *map(str, files)], {}, None),
        "safetensors_read": ([py, "-c", SAFETENSORS_READ, *map(str, files)], {}, None),
        "raw_copy": ([py, "-c", RAW_COPY, str(copy_dir), *map(str, files)], {},
                     lambda: (shutil.rmtree(copy_dir, ignore_errors=True), _warm(files))),
    }
    if args.converter_reference_src is not None:
        ref = pathlib.Path(args.converter_reference_src).absolute()
        contenders["convert_reference"] = ([py, "-m", "perft_jax.convert.cli", *convert_args],
                                           {"cwd": ref, "env": {**os.environ, "PYTHONPATH": str(ref)}},
                                           fresh_output)
    contenders["convert_no_torch"] = ([py, "-c", HIDE_TORCH + CONVERT, *convert_args], {}, fresh_output)
    contenders["convert"] = ([py, "-m", "perft_jax.convert.cli", *convert_args], {}, fresh_output)  # last: du

    results = {"checkpoint": checkpoint, "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    _log(f"measuring: {repeats} interleaved rounds of {', '.join(contenders)}")
    results.update(_interleaved(contenders, repeats))
    shutil.rmtree(copy_dir, ignore_errors=True)
    results["converted_bytes"] = _du(out_dir)
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results.update(command=f"cd {REPO} && {py} -m perft_jax.convert.cli {' '.join(convert_args)}",
                   reference_src=str(args.converter_reference_src or ""), date=time.strftime("%Y-%m-%d %H:%M"),
                   machine=f"{os.cpu_count()} CPUs, "
                           f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM")
    total = checkpoint["total_bytes"]
    for name in ("raw_read", "safetensors_read", "raw_copy", "convert", "convert_no_torch", "convert_reference"):
        if name in results:
            results[name]["gb_per_s"] = total / GB / results[name]["wall_s"]
    peak = results["convert"]["peak_rss_bytes"]
    target = 2 * checkpoint["largest_tensor_bytes"] + GIB
    conv = results["convert"]["gb_per_s"]
    results["target"] = {
        "peak_rss_bytes": target, "met": peak <= target,
        "convert_above_baseline_bytes": peak - results["baseline"]["peak_rss_bytes"],
        "convert_vs_raw_read": conv / results["raw_read"]["gb_per_s"],
        "convert_vs_safetensors_read": conv / results["safetensors_read"]["gb_per_s"],
        "convert_vs_raw_copy": conv / results["raw_copy"]["gb_per_s"],
    }
    results["tables"] = _tables(results)
    return results


def main(argv: list[str] | None = None) -> int:
    return standalone_main(__doc__, "python -m benchmarks.converter", add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
