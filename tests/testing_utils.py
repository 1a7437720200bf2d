"""Small helpers shared by test modules: repository paths and import inspection."""
import ast
import pathlib

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


class CharTokenizer:
    """One id per character (its code point); "\\x03" is EOS. Makes every count in the EOS rule visible."""

    eos_id, pad_id, bos_id, source = 3, 0, None, "chars"

    def encode(self, text, max_length=None):
        return [ord(c) for c in text][:max_length]

    def encode_batch(self, texts, max_length=None):
        return [self.encode(t, max_length) for t in texts]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))
