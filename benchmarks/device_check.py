"""The device check (issue 13 item 9): one run on one GPU, its parts each a process of their own.

    benchmarks/device_check.sh [--smoke]            # the wrapper: budget, timeouts, summary
    python -m benchmarks.device_check --part P --out DIR [--smoke]

Parts (each writes DIR/<part>.json, rewritten after every finished row, so a part killed at its timeout keeps
what it finished):
- `env`: versions, devices, which imports the benchmark path has (and which project extras it lacks).
- `parity`: `gmm` (models/moe/kernels.py) of every implementation the device runs, forward and both gradients,
  against a float32 per-group reference, beside `xla` (ragged_dot, the XLA reference) at OLMoE and Mixtral
  expert shapes; ragged groups, an empty group and rows past the last group included. Passes when every
  implementation is within 2e-2 relative L2 of the reference and within 2x (+1e-3) of `xla`'s own error.
- `dispatch`: one MoE layer at OLMoE width, forward + backward (frozen and full), every `DISPATCH` backend
  side by side (benchmarks/moe_dispatch.py's block and step), each checked against `dense` (rel L2).
- `olmoe`, `mixtral`: the PERFT-R train step (`train_step_fn`: forward, backward into the adapters, AdamW) on
  random weights made on the device by one jitted init, bf16 base, f32 adapters, the paper's PERFT-R Top2/8
  D_B 32 (configs/perft/*-perft-r.yaml). OLMoE-1B-7B at full depth (16 layers, ~13.8 GB of weights) at seq 256
  and 2048; Mixtral-8x7B at its width with the depth cut to `--mixtral-layers` (16 of 32 by default: ~47 GB of
  the ~93 GB full bf16 base; the full model does not fit one device beside its activations).
  Timed with benchmarks/common.py `time_interleaved`, interleaved with a bf16 [8192 x 8192] matmul whose
  median is the MFU denominator. FLOPs/token = 4 N_active + 6 N_adapter (frozen base: forward + input gradient;
  adapters: forward + both gradients), N_active = `efficiency_report(...).base_activated` (it counts the
  embedding table too, a gather: `embedding_params` is recorded to subtract), N_adapter =
  `.activated_trainable_params_per_token`. Attention scores are not parameters: recorded apart.
- `summary`: the JSON files as one table.

`--smoke`: tiny shapes and few steps, so the whole Python path runs on a CPU in a minute or two.
Imports only what the device has: not `datasets`, `tensorboardX` or `tokamax` (nothing here pulls them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time
import traceback
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parent.parent
# Imported by the benchmark path on the device; `optional` are the project's own dependencies it must not need.
REQUIRED = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "transformers", "numpy", "ml_dtypes",
            "yaml", "safetensors", "tensorstore")
OPTIONAL = ("datasets", "tensorboardX", "tokamax", "torch")
MODELS = {"olmoe": ("olmoe-1b-7b", 16), "mixtral": ("mixtral-8x7b", 32)}  # config name, full depth
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_heads=4, head_dim=16, num_experts=8)


def _log(msg: str) -> None:
    print(f"[device_check] {msg}", file=sys.stderr, flush=True)


def _rel_l2(got, want) -> float:
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


class Results:
    """One part's JSON file, rewritten after each row (write-then-rename: never half a file)."""

    def __init__(self, out: pathlib.Path, part: str, **head):
        from benchmarks.common import write_json

        self.path, self._write = out / f"{part}.json", write_json
        self.data: dict[str, Any] = {"part": part, "started": time.strftime("%Y-%m-%d %H:%M:%S"), **head,
                                     "rows": []}
        self.flush()

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.flush()

    def flush(self) -> None:
        self._write(self.path, self.data)


def _guarded(results: Results, name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one row; a failure (out of memory, a kernel that does not lower) is recorded, and the part goes on."""
    start = time.perf_counter()
    try:
        row = fn()
    except Exception as e:  # noqa: BLE001 - record whatever broke and go on to the next row
        _log(f"{name}: FAILED {type(e).__name__}: {str(e)[:500]}")
        row = {"error": f"{type(e).__name__}: {str(e)[:2000]}", "traceback": traceback.format_exc()[-4000:]}
    row = {"name": name, **row, "wall_s": time.perf_counter() - start}
    results.add(row)
    _log(f"{name}: done in {row['wall_s']:.1f} s")


# ---- env ----------------------------------------------------------------------------------------------------

def part_env(args) -> None:
    import importlib
    import importlib.metadata

    missing = []
    for module in ("perft_jax.train.step", "perft_jax.models.moe.kernels", "perft_jax.perft.efficiency",
                   "benchmarks.moe_dispatch", "benchmarks.train_step"):  # the benchmark path, first
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - an import may fail for reasons other than absence
            missing.append(f"{module} ({type(e).__name__}: {str(e)[:300]})")
    # What it pulled in of the packages the device lacks: must stay empty.
    bench_path = sorted({m.split(".")[0] for m in sys.modules} & {"datasets", "tensorboardX", "tokamax"})
    versions = {}
    for name in REQUIRED:
        try:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", None) or importlib.metadata.version(name.split(".")[0])
        except Exception as e:  # noqa: BLE001
            versions[name] = None
            missing.append(f"{name} ({type(e).__name__}: {str(e)[:200]})")
    for name in OPTIONAL:  # installed or not, without importing them
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    import jax

    dev = jax.devices()[0]
    data = {"part": "env", "python": platform.python_version(), "executable": sys.executable,
            "platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "versions": versions, "missing": missing, "optional_imported_by_benchmark_path": bench_path,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "pythonpath": os.environ.get("PYTHONPATH", "")}
    from benchmarks.common import write_json

    write_json(args.out / "env.json", data)
    print(json.dumps({k: data[k] for k in ("platform", "device_kind", "versions", "missing",
                                           "optional_imported_by_benchmark_path")}, indent=1))
    if missing:
        raise SystemExit(f"missing on this machine: {missing}")


# ---- parity -------------------------------------------------------------------------------------------------

def _parity_case(impl: str, m: int, k: int, n: int, groups: int, dtype: str) -> dict[str, Any]:
    """gmm(impl) and its two gradients against a float32 per-group reference (one matmul per group)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from perft_jax.models.moe.kernels import gmm

    keys = jax.random.split(jax.random.key(0), 4)
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(keys[1], (groups, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    cot = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)
    # Ragged sizes, group 1 empty, the last 1/16 of the rows past every group (gmm must give zeros there).
    rng = np.random.default_rng(0)
    used = m - m // 16
    cuts = np.sort(rng.choice(np.arange(1, used), groups - 1, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [used]]))
    sizes[0] += sizes[1]
    sizes[1] = 0
    group_sizes = jnp.asarray(sizes, jnp.int32)

    def reference(lhs, rhs):  # rows are sorted by group: one float32 matmul per group, zeros past the last
        parts, row = [], 0
        for g, size in enumerate(sizes.tolist()):
            parts.append(jnp.matmul(lhs[row:row + size].astype(jnp.float32), rhs[g].astype(jnp.float32),
                                    precision=jax.lax.Precision.HIGHEST))
            row += size
        return jnp.concatenate(parts + [jnp.zeros((m - used, n), jnp.float32)])

    def loss(f):
        return lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * cot.astype(jnp.float32))

    kernel = lambda a, b: gmm(a, b, group_sizes, impl=impl)  # noqa: E731
    # Wrapped in `jnp.sum(... * cot)` so one VJP gives both gradients, as the train step's backward does.
    fwd = jax.jit(kernel)(lhs, rhs)
    dl, dr = jax.jit(jax.grad(loss(kernel), argnums=(0, 1)))(lhs, rhs)
    ref = jax.jit(reference)(lhs, rhs)
    # The reference's gradients w.r.t. float32 copies: unrounded, so the kernels' bf16 rounding shows.
    ref_dl, ref_dr = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(lhs.astype(jnp.float32),
                                                                          rhs.astype(jnp.float32))
    text = jax.jit(jax.grad(loss(kernel), argnums=(0, 1))).lower(lhs, rhs).as_text()
    return {"impl": impl, "shape": [m, k, n, groups], "dtype": dtype,
            "fwd_rel_l2": _rel_l2(fwd, ref), "dlhs_rel_l2": _rel_l2(dl, ref_dl), "drhs_rel_l2": _rel_l2(dr, ref_dr),
            "tail_max_abs": float(jnp.max(jnp.abs(fwd[used:].astype(jnp.float32)))),
            "mosaic_in_hlo": "mosaic" in text.lower()}


def part_parity(args) -> None:
    import jax

    platform_ = jax.devices()[0].platform
    impls = {"gpu": ("xla", "mosaic_gpu", "auto"), "tpu": ("xla", "megablox", "auto")}.get(platform_, ("xla", "auto"))
    if args.smoke:
        shapes = {"tiny": (512, 64, 128, 8)}
    else:  # [T*K, D] x [E, D, 2I] (gate/up) and [T*K, I] x [E, I, D] (down), T = 4096 tokens
        shapes = {"olmoe gate_up": (4096 * 8, 2048, 2048, 64), "olmoe down": (4096 * 8, 1024, 2048, 64),
                  "mixtral gate_up": (4096 * 2, 4096, 28672, 8), "mixtral down": (4096 * 2, 14336, 4096, 8)}
    res = Results(args.out, "parity", platform=platform_, impls=list(impls),
                  tolerance="rel L2 <= 2e-2 and <= 2x xla + 1e-3")
    for label, shape in shapes.items():
        for impl in impls:
            _guarded(res, f"{label} {impl}", lambda impl=impl, shape=shape: _parity_case(impl, *shape, "bfloat16"))
    errors = ("fwd_rel_l2", "dlhs_rel_l2", "drhs_rel_l2")
    ok = True
    for row in res.data["rows"]:
        xla = next((r for r in res.data["rows"] if r.get("impl") == "xla" and r["name"].rsplit(" ", 1)[0]
                    == row["name"].rsplit(" ", 1)[0] and "error" not in r), None)
        row["pass"] = "error" not in row and row["tail_max_abs"] == 0 and all(
            row[e] <= 2e-2 and (xla is None or row[e] <= 2 * xla[e] + 1e-3) for e in errors)
        ok &= row["pass"]
    res.data["pass"] = ok
    res.flush()


# ---- dispatch -----------------------------------------------------------------------------------------------

def part_dispatch(args) -> None:
    import jax
    import numpy as np

    from benchmarks.common import time_interleaved
    from benchmarks.moe_dispatch import _block, _flops, _step
    from perft_jax.models.moe.experts import DISPATCH

    shape = (dict(tokens=256, hidden=64, experts=8, top_k=2, intermediate=32) if args.smoke else
             dict(tokens=8192, hidden=2048, experts=64, top_k=8, intermediate=1024))  # OLMoE's layer
    shape = argparse.Namespace(**shape, capacity_factor=2.0, repeats=args.repeats)
    res = Results(args.out, "dispatch", shape=vars(shape), dtype="bfloat16", loss="sum(y^2)")
    x = jax.random.normal(jax.random.key(0), (1, shape.tokens, shape.hidden)).astype("bfloat16")
    for full in (False, True):
        mode = "full" if full else "frozen"
        steps, fns = {}, {}
        for backend in DISPATCH:
            try:
                steps[backend] = _step(_block(shape, backend, "bfloat16"), full)
                fns[backend] = lambda s=steps[backend]: jax.block_until_ready(s(x))
            except Exception as e:  # noqa: BLE001
                res.add({"name": f"{backend} {mode}", "error": f"{type(e).__name__}: {str(e)[:1000]}"})
        try:
            timings = time_interleaved(fns, shape.repeats, warmup=1)
        except Exception as e:  # noqa: BLE001 - one backend failing to compile: time the others one by one
            _log(f"dispatch {mode}: {type(e).__name__}; timing backends one at a time")
            timings = {}
            for b, fn in fns.items():
                try:
                    timings.update(time_interleaved({b: fn}, shape.repeats, warmup=1))
                except Exception as e2:  # noqa: BLE001
                    res.add({"name": f"{b} {mode}", "error": f"{type(e2).__name__}: {str(e2)[:1000]}"})
        ref = None
        for backend in sorted(timings, key=lambda b: b != "dense"):  # dense first: the reference
            (value, dropped), grads = steps[backend](x)
            dx = np.asarray(grads[1] if full else grads, np.float32)
            ref = ref or (float(value), dx)
            t = timings[backend]
            res.add({"name": f"{backend} {mode}", "backend": backend, "backward": mode, "ms": t.median_s * 1e3,
                     "useful_tflops": _flops(shape, full) / t.median_s / 1e12, "first_s": t.first_s,
                     "dropped": int(dropped), "loss_rel_err": abs(float(value) - ref[0]) / abs(ref[0]),
                     "dx_rel_l2_vs_dense": _rel_l2(dx, ref[1])})


# ---- train step ---------------------------------------------------------------------------------------------

def _configs(model: str, args):
    """(ModelConfig, PerftConfig, layers) of `model` at bf16, from configs/hf and configs/perft."""
    import yaml

    from perft_jax.models.hf_config import read_hf_config_file
    from perft_jax.perft.config import PerftConfig

    name, full = MODELS[model]
    cfg, _, _ = read_hf_config_file(REPO / "configs" / "hf" / f"{name}.json")
    perft = PerftConfig(**yaml.safe_load((REPO / "configs" / "perft" / f"{name}-perft-r.yaml").read_text())["perft"])
    layers = args.mixtral_layers if model == "mixtral" else full
    changes = dict(dtype="bfloat16", param_dtype="bfloat16", moe_backend=args.backend,
                   attention_impl=args.attention, remat=args.remat)
    if args.smoke:
        layers = 2
        changes.update(TINY, num_kv_heads=TINY["num_heads"] // (cfg.num_heads // cfg.num_kv_heads),
                       num_experts_per_tok=min(cfg.num_experts_per_tok, 4), eos_token_id=2, pad_token_id=1,
                       bos_token_id=None)
    return cfg.replace(num_layers=layers, **changes), perft, full


def init_on_device(cfg, perft, seed: int = 0):
    """Random base + adapters made by one jitted program on the default device: no host copy of the weights, no
    float32 temporaries of whole tensors left behind. The same parameters `init_model` + `attach_perft` make."""
    import jax
    from flax import nnx

    from perft_jax.models.decoder import MoeForCausalLM
    from perft_jax.perft.attach import attach_perft

    def build():
        return attach_perft(MoeForCausalLM(cfg, nnx.Rngs(seed)), perft, seed=seed)

    graphdef = nnx.graphdef(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.state(build()))()
    # Committed to the first device, as init_model / a restore leave it: the step then compiles once.
    return nnx.merge(graphdef, jax.device_put(state, jax.local_devices()[0]))


def _train_row(cfg, perft, full_layers: int, batch: int, seq: int, args) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks.common import matmul_fn, time_interleaved
    from benchmarks.train_step import OPTIM, flops_per_token
    from perft_jax.perft.efficiency import efficiency_report
    from perft_jax.train.optim import make_optimizer
    from perft_jax.train.step import split_model, train_step_fn

    start = time.perf_counter()
    model = init_on_device(cfg, perft)
    jax.block_until_ready(nnx.state(model))
    init_s = time.perf_counter() - start
    optimizer = make_optimizer(model, OPTIM)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(batch, seq)).astype(np.int32)
    data = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids)}
    graphdef, trainable, frozen = split_model(model)
    opt_graphdef, opt_state = nnx.split(optimizer)
    del model, optimizer  # the step's arrays live in `state` and `frozen` only (trainable / opt state donated)
    state = {"trainable": trainable, "opt": opt_state, "metrics": None}

    def step():
        state["trainable"], state["opt"], state["metrics"] = train_step_fn(
            graphdef, opt_graphdef, state["trainable"], frozen, state["opt"], data, cfg, perft)
        jax.block_until_ready(state["metrics"])

    mm, mm_flops = matmul_fn("bfloat16", args.matmul_size)
    timings = time_interleaved({"step": step, "matmul": mm}, args.repeats, args.warmup)
    report = efficiency_report(cfg, perft)
    n_active, n_adapter = report.base_activated, report.activated_trainable_params_per_token
    fpt = 4 * n_active + 6 * n_adapter
    tokens = batch * seq
    t, peak = timings["step"], mm_flops / timings["matmul"].median_s
    metrics = {k: float(v) for k, v in state["metrics"].items() if k in ("total", "grad_norm", "lm")}
    mem = jax.local_devices()[0].memory_stats() or {}
    return {"model": cfg.model_type, "layers": cfg.num_layers, "full_layers": full_layers, "batch": batch,
            "seq": seq, "tokens": tokens, "backend": cfg.moe_backend, "attention": cfg.attention_impl,
            "remat": cfg.remat, "init_s": init_s, "first_step_s": t.first_s, "step_ms": t.median_s * 1e3,
            "best_ms": min(t.times_s) * 1e3, "tokens_per_s": tokens / t.median_s,
            "n_active": n_active, "n_adapter_active": n_adapter, "embedding_params": cfg.vocab_size * cfg.hidden_size,
            "flops_per_token": fpt, "tflops": fpt * tokens / t.median_s / 1e12, "peak_tflops": peak / 1e12,
            "mfu": fpt * tokens / t.median_s / peak,
            "attention_score_flops_per_token": flops_per_token(cfg, perft, seq)["attention_score_flops_per_token"],
            "base_bytes": sum(x.nbytes for x in jax.tree.leaves(frozen)),
            "peak_bytes_in_use": mem.get("peak_bytes_in_use"), "bytes_limit": mem.get("bytes_limit"),
            "metrics": metrics, "finite": bool(np.isfinite(list(metrics.values())).all()),
            "times_ms": [x * 1e3 for x in t.times_s]}


def part_train(args, model: str) -> None:
    cfg, perft, full = _configs(model, args)
    runs = {"olmoe": [(16, 256), (4, 2048)], "mixtral": [(2, 2048)]}[model]
    if args.smoke:
        runs = [(2, 32)]
    note = f"{cfg.num_layers} of {full} layers" + ("" if cfg.num_layers == full else " (depth cut to fit one device)")
    res = Results(args.out, model, perft=dataclasses.asdict(perft),
                  depth_note="smoke: tiny shapes" if args.smoke else note)
    for batch, seq in runs:
        _guarded(res, f"{model} b{batch} s{seq}", lambda b=batch, s=seq: _train_row(cfg, perft, full, b, s, args))


# ---- summary ------------------------------------------------------------------------------------------------

def part_summary(args) -> None:
    from benchmarks.common import markdown_table

    def load(part):
        path = args.out / f"{part}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    lines = []
    env = load("env")
    if env:
        v = env["versions"]
        lines.append(f"device: {env['platform']} {env['device_kind']} x{env['device_count']}; jax {v['jax']}, "
                     f"jaxlib {v['jaxlib']}, flax {v['flax']}, optax {v['optax']}, orbax {v['orbax.checkpoint']}; "
                     f"missing: {env['missing'] or 'none'}")
    parity = load("parity")
    if parity:
        lines += [f"\n## kernel parity ({parity['tolerance']}): {'PASS' if parity.get('pass') else 'FAIL'}", "",
                  markdown_table(parity["rows"], [
                      ("name", "case", "s"), ("fwd_rel_l2", "fwd", ".2e"), ("dlhs_rel_l2", "d lhs", ".2e"),
                      ("drhs_rel_l2", "d rhs", ".2e"), ("tail_max_abs", "tail", "g"),
                      ("mosaic_in_hlo", "mosaic", ""), ("pass", "pass", ""), ("error", "error", ".80s")])]
    dispatch = load("dispatch")
    if dispatch:
        lines += [f"\n## dispatch, one layer {dispatch['shape']}", "", markdown_table(dispatch["rows"], [
            ("name", "backend", "s"), ("ms", "ms", ".2f"), ("useful_tflops", "useful TFLOP/s", ".1f"),
            ("first_s", "compile+1st s", ".1f"), ("dx_rel_l2_vs_dense", "dx rel L2", ".1e"),
            ("dropped", "dropped", "d"), ("error", "error", ".80s")])]
    for model in MODELS:
        data = load(model)
        if data:
            lines += [f"\n## PERFT-R train step, {model} ({data['depth_note']}), bf16 base", "",
                      markdown_table(data["rows"], [
                          ("name", "run", "s"), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"),
                          ("tflops", "TFLOP/s", ".1f"), ("peak_tflops", "bf16 mm peak", ".0f"), ("mfu", "MFU", ".1%"),
                          ("first_step_s", "compile+1st s", ".1f"), ("init_s", "init s", ".1f"),
                          ("peak_bytes_in_use", "peak bytes", ",d"), ("finite", "finite", ""),
                          ("error", "error", ".80s")])]
    text = "\n".join(lines)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)


PARTS = {"env": part_env, "parity": part_parity, "dispatch": part_dispatch, "summary": part_summary,
         "olmoe": lambda a: part_train(a, "olmoe"), "mixtral": lambda a: part_train(a, "mixtral")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=PARTS, required=True)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(os.environ.get("OUT") or "/tmp/device_check_out"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few steps (a CPU run of the whole path)")
    p.add_argument("--backend", default="auto", help="moe_backend of the train step (auto: kernel on GPU)")
    p.add_argument("--attention", default="auto", help="attention_impl of the train step (auto: cudnn on GPU)")
    p.add_argument("--remat", action="store_true", help="recompute each layer in the backward pass")
    p.add_argument("--mixtral-layers", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; smoke 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 bf16 peak matmul (default 8192)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.smoke else 5)
    args.matmul_size = args.matmul_size or (256 if args.smoke else 8192)
    args.out.mkdir(parents=True, exist_ok=True)
    PARTS[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
