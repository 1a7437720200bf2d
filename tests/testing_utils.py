"""Small helpers shared by test modules: repository paths, import and jaxpr inspection."""
import ast
import pathlib

import jax

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"


def imported_top_level_modules(path: str | pathlib.Path) -> set[str]:
    """Top-level package names a Python source file imports (to pin a module's dependencies)."""
    imported = set()
    for node in ast.walk(ast.parse(pathlib.Path(path).read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    return imported


# Primitives whose sub-jaxprs do the computing (calls, loops, branches); any other primitive with a sub-jaxpr
# (a Pallas kernel) computes its outputs itself and is counted by them.
_PASS_THROUGH = {"pjit", "jit", "closed_call", "core_call", "while", "scan", "cond", "custom_vjp_call",
                 "custom_jvp_call", "checkpoint", "remat", "shard_map", "custom_vjp_call_jaxpr"}


def outputs_shaped(jaxpr, shape) -> int:
    """Equations anywhere in `jaxpr` that compute an array of `shape`: e.g. whether a backward pass builds anything
    weight-sized for a frozen weight. Calls and loops are looked into rather than counted (a loop carrying a
    weight through, or an optimization barrier on it, computes nothing of that size)."""
    count = 0
    for eqn in jaxpr.eqns:
        subs = []
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    subs.append(sub)
        if subs and eqn.primitive.name in _PASS_THROUGH:
            count += sum(outputs_shaped(sub, shape) for sub in subs)
        elif eqn.primitive.name != "optimization_barrier":
            count += sum(getattr(v.aval, "shape", None) == tuple(shape) for v in eqn.outvars)
    return count


class CharTokenizer:
    """One id per character (its code point); "\\x03" is EOS. Makes every count in the EOS rule visible."""

    eos_id, pad_id, bos_id, source = 3, 0, None, "chars"

    def encode(self, text, max_length=None):
        return [ord(c) for c in text][:max_length]

    def encode_batch(self, texts, max_length=None):
        return [self.encode(t, max_length) for t in texts]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))
