"""Shared benchmark plumbing: interleaved timing, the machine's matmul peak, environment, tables, JSON.

Every comparison in the suite is timed with :func:`time_interleaved`: all contenders are warmed up (compiled)
first, then timed in rounds — one call of each contender per round — so that a slow minute of a shared
machine (other processes, thermal) hits every contender alike instead of whichever happened to run then.
The median over rounds is reported.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Timing:
    median_s: float
    times_s: list[float]
    first_s: float  # compile + first call (jit) or first call (torch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Warm up each callable `warmup` times, then time `repeats` interleaved rounds; median per callable.

    Each callable must return only once its work is done (e.g. `jax.block_until_ready` inside it).
    """
    first = {}
    for name, fn in fns.items():
        for i in range(max(warmup, 1)):
            start = time.perf_counter()
            fn()
            if i == 0:
                first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(ts), ts, first[name]) for name, ts in times.items()}


def matmul_fn(dtype: str = "float32", n: int = 2048) -> tuple[Callable[[], Any], float]:
    """A jitted n x n x n matmul and its FLOPs: the denominator of every MFU figure (time it beside the rest).

    XLA's CPU matmul (what our train step runs on) is the honest ceiling, not the vendor's number.
    """
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul)
    return (lambda: jax.block_until_ready(f(a, b))), 2.0 * n**3


def matmul_peak_gflops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    fn, flops = matmul_fn(dtype, n)
    return flops / time_interleaved({"mm": fn}, repeats)["mm"].median_s / 1e9


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """What the numbers were measured on. The load average matters: the development machines are shared."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind} x{jax.device_count()}",
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": os.getloadavg(),
    }
    for module in ("jaxlib", "flax", "optax", "torch", "transformers"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    return env


def device_line(env: dict[str, Any]) -> str:
    return (f"device: {env['device']} ({env['cpu']}, {env['cpu_count']} cores); jax {env['jax']}, "
            f"flax {env['flax']}, torch {env['torch']}, transformers {env['transformers']}; "
            f"load average at start {env['loadavg_start'][0]:.2f}")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as a markdown table; `columns` = (key, header, format spec); a missing key prints '–'."""
    def cell(row, key, spec):
        value = row.get(key)
        return "–" if value is None else format(value, spec)

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r, k, s) for k, _, s in columns) + " |" for r in rows]
    return "\n".join(lines)


def standalone_main(module_doc: str, prog: str, add_arguments: Callable, run: Callable,
                    argv: list[str] | None = None) -> int:
    """`python -m benchmarks.<one>`: that benchmark's own options without the suite's prefix, its tables
    printed, and the results written as JSON with `--out`."""
    import argparse

    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=module_doc.split("\n")[0]), prefix="--")
    parser.add_argument("--out", type=pathlib.Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    results = run(args)
    for title, table in results["tables"].items():
        print(f"## {title}\n\n{table}\n")
    if args.out is not None:
        write_json(args.out, results)
    return 0


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write to a temporary sibling, then rename: an interrupted run never leaves half a results file."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
