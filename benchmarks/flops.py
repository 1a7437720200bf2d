"""FLOP audit of the lowered accelerator program (issue 13 item 7): matmul work in the exported train step.

The bench-small PERFT-R train step (benchmarks/train_step.py `BENCHES`, `PERFT`; bfloat16, so that the GPU
kernels apply) is exported with `jax.export` for `cuda` and `tpu` on abstract arrays (no weights, no device),
and the matmul FLOPs of its StableHLO are counted (`count_flops`):
- `stablehlo.dot_general`: 2 * prod(result) * prod(contracting sizes);
- `chlo.ragged_dot`: 2 * prod(lhs) * (rhs's free width): the lhs rows bound the real work, whatever the groups;
- Pallas grouped-matmul custom calls (`tpu_custom_call` megablox gmm / tgmm, `mosaic_gpu` ragged dot):
  2 * prod(first 2-D float operand) * (the result's last width), i.e. 2 M K N over the kernel's (padded) rows;
- attention kernels (splash `tpu_custom_call`s, cuDNN `__cudnn$fmha*`) and the `xla_attention` dots (by their
  source location) are counted apart, as `attention`: 2 * B*H*T*hd * S per matmul, full T x S (no causal skip);
  forward 2 matmuls, cuDNN backward 5, splash dq 3 and dkv 4;
- a `func.call` counts its callee (JAX lowers a repeated jitted function once and calls it); `stablehlo.case`
  the branch its constant index picks (`platform_dependent`), else the largest; `stablehlo.while` its body times
  a bound: the constant of its condition, else (a loop with a traced trip count, the `grouped` backend's block
  loop) the largest leading size of a loop-carried array whose row is a dot operand or result in the body,
  i.e. the static block count. That bounds the blocks any routing uses.

The useful count is `train_step.flops_per_token`: 4 * N_active + 6 * N_adapter per token (the frozen base needs
its forward and its input gradient, the adapters also their weight gradient; spec/ENGINEERING.md §9), with
attention scores apart. `ratio` = counted matmul FLOPs / useful FLOPs: about 1 for a dropless sparse backend (a
little under: nothing trainable sits below layer 0's MoE block, so layer 0's base needs no backward), about
E/K times the experts' share for `dense`, capacity_factor times it for `capacity`.

    python -m benchmarks.flops [--config bench-small] [--backends auto,dense,...] [--platforms cuda,tpu]
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import markdown_table, standalone_main
from benchmarks.train_step import BENCHES, PERFT, flops_per_token, model_config
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.models.moe.experts import DISPATCH
from perft_jax.optim import OptimConfig
from perft_jax.perft.attach import attach_perft
from perft_jax.perft.config import PerftConfig
from perft_jax.train.optim import make_optimizer
from perft_jax.train.step import split_model, train_step_fn

PLATFORMS = ("cuda", "tpu")
BACKENDS = tuple(DISPATCH)  # auto, dense, capacity, grouped, ragged, kernel
# Custom calls without a compatibility guarantee, which exporting must be allowed to serialise.
UNSTABLE_TARGETS = ("__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward", "ragged_all_to_all")
# Attention kernels: matmuls of 2 * (B*H*T*hd) * S each, and where S sits in the key operand's shape.
_ATTENTION_KERNELS = {"__cudnn$fmhaScaleBiasSoftmax": (2, 1), "__cudnn$fmhaScaleBiasSoftmaxBackward": (5, 1),
                      "splash_mha_fwd": (2, 2), "splash_mha_dq": (3, 2), "splash_mha_dkv": (4, 2)}
_FLOAT = re.compile(r"^(f|bf)\d+")


# ---- exporting ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def pretend_cudnn():
    """JAX reads the cuDNN version when it traces cuDNN attention, from its CUDA plugin ("cuDNN is not
    detected." on a CPU-only install). Without the plugin, pretend cuDNN 9.8 so that the rest (shape checks,
    custom-call lowering) runs; with it, nothing changes."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    from perft_jax.models.attention import cudnn_traceable

    if cudnn_traceable():
        yield
        return
    original = fa.check_cudnn_version
    fa.check_cudnn_version = lambda: 90800
    try:
        yield
    finally:
        fa.check_cudnn_version = original


def export(fn, platform: str, *args) -> jax.export.Exported:
    """`jax.jit(fn)` exported for `platform` on `args` (arrays or ShapeDtypeStructs)."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in UNSTABLE_TARGETS]
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)


def train_step_args(cfg, perft: PerftConfig, batch: int, seq: int) -> tuple:
    """`train_step_fn`'s arguments for `cfg` + `perft` on abstract arrays (no weights, no memory)."""
    def build():
        model = attach_perft(MoeForCausalLM(cfg, nnx.Rngs(0)), perft)
        return model, make_optimizer(model, OptimConfig())

    model, optimizer = nnx.eval_shape(build)
    graphdef, trainable, frozen = split_model(model)
    opt_graphdef, opt_state = nnx.split(optimizer)
    tokens = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in ("input_ids", "labels", "attention_mask")}
    return graphdef, opt_graphdef, trainable, frozen, opt_state, tokens, cfg, perft


def abstract_train_step(cfg, perft: PerftConfig, batch: int, seq: int):
    """(fn, args): the library's jitted train step closed over its static arguments, on abstract arrays."""
    graphdef, opt_graphdef, trainable, frozen, opt_state, tokens, cfg, perft = train_step_args(cfg, perft, batch, seq)

    def step(trainable, frozen, opt_state, tokens):
        return train_step_fn(graphdef, opt_graphdef, trainable, frozen, opt_state, tokens, cfg, perft)

    return step, (trainable, frozen, opt_state, tokens)


# ---- counting -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Flops:
    matmul: float = 0.0  # parameter matmuls: dot_general, ragged_dot, grouped-matmul kernels
    attention: float = 0.0  # attention scores and values (QK^T, PV and their gradients)
    kernels: int = 0  # grouped-matmul kernel calls executed (call multiplicity included)
    ragged_dots: int = 0
    # What the ragged_dot composites' decompositions (one dense masked dot per group) would add, should a
    # backend run those instead of a grouped matmul.
    decomposed_extra: float = 0.0
    loops: list = dataclasses.field(default_factory=list)  # (bound, how) of every loop holding a matmul

    def add(self, other: "Flops", times: float = 1.0) -> None:
        self.matmul += times * other.matmul
        self.attention += times * other.attention
        self.kernels += int(times * other.kernels)
        self.ragged_dots += int(times * other.ragged_dots)
        self.decomposed_extra += times * other.decomposed_extra
        self.loops += other.loops


def _shape(value) -> tuple[int, ...]:
    return tuple(value.type.shape)


def _element(value) -> str:
    return str(value.type.element_type)


def _dims(attr: str, key: str) -> list[int]:
    found = re.search(rf"{key} = \[([\d, ]*)\]", attr)
    return [int(x) for x in found.group(1).split(",") if x.strip()] if found else []


def _dot_general(op) -> float:
    attr = str(op.attributes["dot_dimension_numbers"])
    lhs = _shape(op.operands[0])
    contracted = math.prod(lhs[d] for d in _dims(attr, "lhs_contracting_dimensions"))
    return 2.0 * math.prod(_shape(op.results[0])) * contracted


def _ragged_dot(op) -> float:
    """A `chlo.ragged_dot` composite: 2 * prod(lhs) * rhs's free width. Its attribute lists the dimension
    numbers as [lhs batch, rhs batch, lhs contracting, rhs contracting, lhs ragged, rhs group]."""
    attr = str(op.attributes["composite_attributes"])
    numbers = re.search(r"ragged_dot_dimension_numbers = \[(.*?)\]\}", attr).group(1)
    lists = [[int(x) for x in re.findall(r"-?\d+", body)] for body in re.findall(r"dense<([^>]*)>", numbers)]
    rhs = _shape(op.operands[1])
    taken = set(lists[1] + lists[3] + lists[5])
    return 2.0 * math.prod(_shape(op.operands[0])) * math.prod(n for d, n in enumerate(rhs) if d not in taken)


def _kernel_name(op) -> str:
    if "kernel_name" in op.attributes:
        return str(op.attributes["kernel_name"]).strip('"')
    return ""


def _custom_call(op, flops: Flops) -> None:
    target = str(op.attributes["call_target_name"]).strip('"')
    name = target if target.startswith("__cudnn") else _kernel_name(op)
    # The longest matching name: the cuDNN forward's is a prefix of its backward's.
    attention = next((_ATTENTION_KERNELS[k] for k in sorted(_ATTENTION_KERNELS, key=len, reverse=True)
                      if name.startswith(k)), None)
    if attention is not None:
        matmuls, s_axis = attention
        q, k = [v for v in op.operands if len(_shape(v)) == 4][:2]
        flops.attention += matmuls * 2.0 * math.prod(_shape(q)) * _shape(k)[s_axis]
    elif target == "tpu_custom_call" or target.startswith("mosaic_gpu"):
        floats = [v for v in op.operands if _FLOAT.match(_element(v))]
        lhs = next((v for v in floats if len(_shape(v)) == 2), None)
        if lhs is None or not op.results:
            raise ValueError(f"a {target} custom call ({name}) that is no grouped matmul: {floats}")
        flops.matmul += 2.0 * math.prod(_shape(lhs)) * _shape(op.results[0])[-1]
        flops.kernels += 1
    elif target.startswith("__cudnn") or target.startswith("__cublas"):
        raise ValueError(f"uncounted matmul custom call {target}")


def _constant_of(value):
    owner = value.owner
    if hasattr(owner, "name") and owner.name == "stablehlo.constant":
        found = re.search(r"dense<(-?\d+)>", str(owner.attributes["value"]))
        return int(found.group(1)) if found else None
    return None


def _loop_bound(op, body: Flops, dot_shapes: set) -> tuple[int, str]:
    """Trip bound of a while loop (see the module docstring)."""
    cond = op.regions[0].blocks[0]
    for inner in cond.operations:
        if inner.operation.name == "stablehlo.compare":
            for v in inner.operands:
                c = _constant_of(v)
                if c is not None:
                    return c, "constant"
    args = op.regions[1].blocks[0].arguments
    sizes = [_shape(a)[0] for a in args if len(_shape(a)) >= 2 and _shape(a)[1:] in dot_shapes]
    if not sizes:
        raise ValueError("a loop holding a matmul with no bound found")
    return max(sizes), "carried rows"


class _Counter:
    def __init__(self, module):
        self.funcs = {str(f.attributes["sym_name"]).strip('"'): f for f in module.body.operations
                      if f.operation.name == "func.func"}
        self.memo: dict[str, Flops] = {}

    def func(self, name: str) -> Flops:
        if name not in self.memo:
            self.memo[name] = self.region(self.funcs[name].regions[0], set())
        return self.memo[name]

    def region(self, region, dot_shapes: set) -> Flops:
        flops = Flops()
        for block in region.blocks:
            for op in block.operations:
                self.op(op, flops, dot_shapes)
        return flops

    def op(self, op, flops: Flops, dot_shapes: set) -> None:
        name = op.operation.name
        if name == "stablehlo.dot_general":
            location = str(op.location)
            if "xla_attention" in location:
                flops.attention += _dot_general(op)
            else:
                flops.matmul += _dot_general(op)
            dot_shapes.update({_shape(op.operands[0]), _shape(op.operands[1]), _shape(op.results[0])})
        elif name == "stablehlo.dot":
            raise ValueError("stablehlo.dot is not counted (JAX emits dot_general)")
        elif name == "stablehlo.composite":
            decomposition = self.func(str(op.attributes["decomposition"]).lstrip("@").strip('"'))
            if str(op.attributes["name"]).strip('"') == "chlo.ragged_dot":
                work = _ragged_dot(op)
                flops.matmul += work
                flops.ragged_dots += 1
                flops.decomposed_extra += decomposition.matmul - work
            else:
                flops.add(decomposition)
        elif name == "chlo.ragged_dot":
            raise ValueError("a bare chlo.ragged_dot (JAX 0.10 emits a composite) is not counted")
        elif name == "stablehlo.custom_call":
            _custom_call(op, flops)
        elif name in ("func.call", "call"):
            flops.add(self.func(str(op.attributes["callee"]).lstrip("@").strip('"')))
        elif name == "stablehlo.case":
            index = _constant_of(op.operands[0])
            branches = [self.region(r, dot_shapes) for r in op.regions]
            picked = branches[index] if index is not None and 0 <= index < len(branches) else \
                max(branches, key=lambda f: f.matmul + f.attention)
            flops.add(picked)
        elif name == "stablehlo.if":
            flops.add(max((self.region(r, dot_shapes) for r in op.regions), key=lambda f: f.matmul + f.attention))
        elif name == "stablehlo.while":
            shapes: set = set()
            body = self.region(op.regions[1], shapes)
            if body.matmul or body.attention:
                bound, how = _loop_bound(op, body, shapes)
                flops.add(body, bound)
                flops.loops.append((bound, how))


def count_flops(module_text: str) -> Flops:
    """Matmul and attention FLOPs of a StableHLO module's `main` (see the module docstring)."""
    from jax._src.interpreters import mlir as jmlir
    from jax._src.lib.mlir import ir

    with jmlir.make_ir_context() as ctx:
        module = ir.Module.parse(module_text, context=ctx)
        return _Counter(module).func("main")


# ---- the audit ----------------------------------------------------------------------------------------------

def audit(bench: str = "bench-small", backend: str = "auto", platform: str = "tpu", perft: PerftConfig = PERFT,
          dtype: str = "bfloat16", capacity_factor: float = 1.25) -> dict[str, Any]:
    """Counted against useful FLOPs of one train step of `bench`, exported for `platform` on `backend`."""
    b = BENCHES[bench]
    cfg = model_config(b, moe_backend=backend, dtype=dtype, param_dtype=dtype, capacity_factor=capacity_factor)
    fn, args = abstract_train_step(cfg, perft, b.batch, b.seq)
    with pretend_cudnn():
        text = export(fn, platform, *args).mlir_module()
    counted = count_flops(text)
    tokens = b.batch * b.seq
    useful = flops_per_token(cfg, perft, b.seq)
    return {"bench": bench, "backend": backend, "platform": platform, "tokens": tokens,
            "counted": counted.matmul, "useful": useful["flops_per_token"] * tokens,
            "ratio": counted.matmul / (useful["flops_per_token"] * tokens),
            "attention": counted.attention, "attention_full": useful["attention_score_flops_per_token"] * tokens,
            "kernels": counted.kernels, "ragged_dots": counted.ragged_dots,
            "ratio_if_decomposed": (counted.matmul + counted.decomposed_extra) / (useful["flops_per_token"] * tokens),
            "loop_bounds": sorted({f"{n} ({how})" for n, how in counted.loops}),
            "experts_share": _experts_share(cfg, useful)}


def _experts_share(cfg, useful) -> float:
    """The top-k experts' part of the useful FLOPs: dense runs E/K times it, capacity capacity_factor times."""
    experts = cfg.num_layers * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.intermediate_size
    return 4 * experts / useful["flops_per_token"]


def add_arguments(parser, prefix: str = "--flops-"):
    parser.add_argument(f"{prefix}backends", default=",".join(BACKENDS), help="MoE backends audited (flops)")
    parser.add_argument(f"{prefix}platforms", default=",".join(PLATFORMS), help="export platforms (flops)")
    return parser


def run(args) -> dict[str, Any]:
    bench = getattr(args, "config", None) or "bench-small"
    bench = bench if bench in BENCHES else "bench-small"
    backends = getattr(args, "flops_backends", None) or getattr(args, "backends", None) or ",".join(BACKENDS)
    platforms = getattr(args, "flops_platforms", None) or getattr(args, "platforms", None) or ",".join(PLATFORMS)
    rows = [audit(bench, backend, platform) for platform in platforms.split(",") for backend in backends.split(",")]
    for r in rows:
        r["counted_g"], r["useful_g"], r["attention_g"] = r["counted"] / 1e9, r["useful"] / 1e9, r["attention"] / 1e9
        r["loops"] = ", ".join(r["loop_bounds"]) or "–"
    columns = [("platform", "platform", "s"), ("backend", "backend", "s"), ("counted_g", "matmul GFLOP", ".2f"),
               ("useful_g", "useful GFLOP", ".2f"), ("ratio", "counted / useful", ".3f"),
               ("attention_g", "attention GFLOP (apart)", ".2f"), ("kernels", "gmm kernel calls", "d"),
               ("ragged_dots", "ragged_dot ops", "d"),
               ("ratio_if_decomposed", "ratio, ragged_dot decomposed", ".3f"), ("loops", "matmul loop bounds", "s")]
    title = (f"flops: {bench} PERFT-R train step, bfloat16, exported per platform; useful = 4 N_active + "
             f"6 N_adapter per token (matmul FLOPs counted in the StableHLO, attention apart)")
    return {"rows": rows, "tables": {title: markdown_table(rows, columns)}}


if __name__ == "__main__":
    import sys

    sys.exit(standalone_main(__doc__, "python -m benchmarks.flops", add_arguments, run))
