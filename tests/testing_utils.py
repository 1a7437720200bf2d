"""Small helpers shared by test modules: repository paths, import and jaxpr inspection."""
import ast
import pathlib
import re

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


# StableHLO ops that move a value without computing one (a loop carrying a weight, a barrier on it, a call).
_PASS_THROUGH = {"stablehlo.while", "stablehlo.optimization_barrier", "func.call", "func.return", "stablehlo.return",
                 "stablehlo.case", "stablehlo.if", "stablehlo.tuple", "stablehlo.get_tuple_element"}
_OP = re.compile(r'= "?([a-z_]+\.[a-z_]+)')


def lowered_ops_shaped(fn, args, shape, dtype="f32") -> int:
    """Ops of the lowered program of `jax.jit(fn)(*args)` that compute an array of `shape` (StableHLO after JAX's
    dead-code elimination, what XLA receives): e.g. whether a backward pass builds anything weight-sized for a
    frozen weight. Ops that only pass a value along (loops, barriers, calls) are not counted."""
    tensor = "tensor<" + "x".join(map(str, shape)) + f"x{dtype}>"
    count = 0
    for line in jax.jit(fn).lower(*args).as_text().splitlines():
        op = _OP.search(line)
        result = line.rsplit("->", 1)[-1] if "->" in line else line.rsplit(":", 1)[-1]
        count += bool(op) and op.group(1) not in _PASS_THROUGH and tensor in result
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
