"""Tokenizers from local files, and the LLM-Adapters training tokenisation (data README §2).

`load_tokenizer` opens an HF tokenizer folder (or a hub repo's snapshot in the local cache), a bare
`tokenizer.json`, or a SentencePiece `.model` file (shared/spec/ENGINEERING.md §8). `tokenize_example` /
`tokenize_batch` implement README §2 "Tokenization and loss" as upstream `finetune.py` does: truncate at
`cutoff_len`, append EOS only when the last token is not EOS and there is room, copy the ids to labels, and
with `train_on_inputs=False` mask as many leading labels as the prompt prefix has tokens.
"""
from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from perft_jax.errors import UserError
from perft_jax.hub import locate, tokenizer_files, tokenizer_patterns
from perft_jax.io import read_json_object
from perft_jax.labels import IGNORE_INDEX

if TYPE_CHECKING:
    from perft_jax.data.config import DataConfig

# Special-token spellings looked up in a bare tokenizer.json, which carries no tokenizer_config.json.
# OLMoE's file (ENGINEERING.md §8): eos `<|endoftext|>` = 50279, pad `<|padding|>` = 1, no BOS.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
_PAD_NAMES = ("<|padding|>", "<pad>", "[PAD]", "<|pad|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer; `load_tokenizer` returns one."""

    eos_id: int | None
    pad_id: int | None
    bos_id: int | None
    vocab_size: int  # ids run 0 .. vocab_size - 1, added tokens included: the embedding rows the model needs
    source: str  # where it was loaded from, for messages

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Ids of `text` with the tokenizer's own special tokens (BOS for Llama/Mixtral), truncated at
        `max_length` tokens counting those special tokens, as HF `tokenizer(text, truncation=True)` does."""
        ...

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """`encode` over many texts (one Rust call for HF tokenizers)."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        ...


class _HFTokenizer:
    """An HF `PreTrainedTokenizerBase` (from a folder, via AutoTokenizer)."""

    def __init__(self, tok, source: str):
        self._tok = tok
        self.source = source
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id
        self.bos_id = tok.bos_token_id
        self.vocab_size = max(tok.get_vocab().values()) + 1

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        return self.encode_batch([text], max_length)[0]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        out = self._tok(list(texts), truncation=max_length is not None, max_length=max_length, padding=False,
                        add_special_tokens=True)
        return [list(ids) for ids in out["input_ids"]]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class _TokenizersFile:
    """A bare `tokenizer.json` read with the `tokenizers` library (what PreTrainedTokenizerFast wraps)."""

    def __init__(self, tok, source: str, eos_token: str | None, pad_token: str | None, bos_token: str | None):
        self._tok = tok
        self.source = source
        self.eos_id = self._find(eos_token, _EOS_NAMES, "eos_token")
        if self.eos_id is None:
            raise UserError(f"{source}: no EOS token among {list(_EOS_NAMES)}; pass eos_token=...")
        self.pad_id = self._find(pad_token, _PAD_NAMES, "pad_token")
        self.bos_id = self._find(bos_token, _BOS_NAMES, "bos_token")
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1

    def _find(self, given: str | None, names: tuple[str, ...], what: str) -> int | None:
        if given is not None:
            token_id = self._tok.token_to_id(given)
            if token_id is None:
                raise UserError(f"{self.source}: {what}={given!r} is not in the vocabulary")
            return token_id
        return next((self._tok.token_to_id(n) for n in names if self._tok.token_to_id(n) is not None), None)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        return self.encode_batch([text], max_length)[0]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        # Truncation is tokenizer state here; HF sets it per call the same way (longest_first, right side,
        # special tokens counted in max_length).
        if max_length is None:
            self._tok.no_truncation()
        else:
            self._tok.enable_truncation(max_length)
        try:
            return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=True)]
        finally:
            self._tok.no_truncation()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class _SentencePiece:
    """A SentencePiece model: exact Llama/Mixtral ids (ENGINEERING.md §8: HF's converted tokenizers differ on
    some whitespace and parse a literal "<s>" as BOS; `LlamaTokenizer(vocab_file=...)` is silently empty)."""

    def __init__(self, path: str, add_bos: bool = True, add_eos: bool = False):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.source = path
        self._add_bos, self._add_eos = add_bos, add_eos
        # SentencePiece reports a missing special token as -1.
        self.bos_id, self.eos_id, self.pad_id = (
            i if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()))
        self.vocab_size = self._sp.get_piece_size()
        if (add_bos and self.bos_id is None) or (add_eos and self.eos_id is None):
            raise UserError(f"{path}: the model has no BOS/EOS piece to add")

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        return self.encode_batch([text], max_length)[0]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        head = [self.bos_id] if self._add_bos else []
        tail = [self.eos_id] if self._add_eos else []
        keep = None if max_length is None else max(max_length - len(head) - len(tail), 0)
        # Like HF truncation: the text is cut, then the special tokens are added around it.
        return [head + ids[:keep] + tail for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # Control pieces (<s>, </s>) decode to "" in SentencePiece either way.
        return self._sp.decode(list(ids))


def load_tokenizer(path_or_dir: str | pathlib.Path, *, eos_token: str | None = None, pad_token: str | None = None,
                   bos_token: str | None = None) -> Tokenizer:
    """Opens a tokenizer from local files (never remote code); a hub repo id is first resolved to its snapshot in
    the local hub cache (downloaded unless HF_HUB_OFFLINE=1; perft_jax/hub.py).

    - a `.model` file: SentencePiece with BOS added, as Mixtral's and Llama's tokenizers do;
    - a folder with `tokenizer.model`: the same, honouring `add_bos_token` / `add_eos_token` of its
      `tokenizer_config.json` (ENGINEERING.md §8: AutoTokenizer on such a folder can drop the "▁" prefix);
    - any other folder: `AutoTokenizer.from_pretrained(dir, local_files_only=True)`;
    - a `.json` file: a bare `tokenizers` file (e.g. OLMoE's); special tokens are found by their usual
      spellings unless given.

    Args:
        path_or_dir: the file or folder, or a hub repo id (`namespace/name`, when no such path exists).
        eos_token, pad_token, bos_token: spellings of the special tokens, for a bare `tokenizer.json` only.

    Raises:
        UserError: the path is missing or of an unknown kind, a folder holds no tokenizer files (never a
            tokenizer built from config.json alone), or the tokenizer has no EOS.
    """
    path = locate(path_or_dir, allow_patterns=tokenizer_patterns()).path
    if not path.exists():
        raise UserError(f"{path}: tokenizer file or folder not found")
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            flags = {}
            config_file = path / "tokenizer_config.json"
            if config_file.is_file():
                flags = read_json_object(config_file, "tokenizer config")
            return _SentencePiece(str(path / "tokenizer.model"), add_bos=bool(flags.get("add_bos_token", True)),
                                  add_eos=bool(flags.get("add_eos_token", False)))
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as err:
            if not tokenizer_files(path):
                raise _no_tokenizer_files(path) from None
            raise UserError(f"{path}: cannot load an HF tokenizer from this folder ({err})") from err
        # Without its vocabulary files, AutoTokenizer still builds the class config.json names, holding only the
        # special tokens (a 2-token tokenizer for OLMoE): every text would tokenise to nothing.
        if not any((path / name).is_file() for name in tok.vocab_files_names.values()):
            raise _no_tokenizer_files(path)
        return _HFTokenizer(tok, str(path))
    if path.suffix == ".model":
        return _SentencePiece(str(path))
    if path.suffix == ".json":
        import tokenizers

        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for a malformed file
            raise UserError(f"{path}: not a `tokenizers` JSON file ({err})") from err
        return _TokenizersFile(tok, str(path), eos_token, pad_token, bos_token)
    raise UserError(f"{path}: expected a tokenizer folder, a tokenizer.json or a SentencePiece .model file")


def _no_tokenizer_files(path: pathlib.Path) -> UserError:
    return UserError(f"{path}: no tokenizer files in this folder (tokenizer.json, tokenizer.model or vocab.json + "
                     "merges.txt): set model.tokenizer to the base's tokenizer (a folder, file or hub name), or "
                     "convert the base again from an HF folder that has its tokenizer files beside the weights")


def check_fits_vocabulary(tokenizer: Tokenizer, vocab_size: int, model: str, pad_id: int | None = None) -> None:
    """Every id `tokenizer` can produce (and the padding id `pad_id`) must index a row of the model's embedding.

    A tokenizer of another model otherwise trains on ids past the embedding (XLA clamps the gather) and ends as a
    NaN loss far from its cause. The tokenizer's own special ids (EOS, PAD, BOS) are among its ids.

    Args:
        tokenizer: from `load_tokenizer`.
        vocab_size: the model's vocabulary (embedding rows).
        model: where the model config came from (a checkpoint or config.json), for the message.
        pad_id: the id padded positions get (`data.pad_id`).

    Raises:
        UserError: naming the tokenizer and the model.
    """
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"tokenizer {tokenizer.source} has ids up to {tokenizer.vocab_size - 1}, but the base model "
                        f"{model} has vocab_size {vocab_size}: they do not belong together; set model.tokenizer to "
                        "the base's own tokenizer")
    if pad_id is not None and not 0 <= pad_id < vocab_size:
        raise UserError(f"data.pad_id: expected an id below the vocab_size {vocab_size} of the base model {model}, "
                        f"got {pad_id}")


class TokenizedExample(NamedTuple):
    """One training row (README §2). Both lists have the same length, at most `cutoff_len`.

    input_ids: [T] token ids, EOS-terminated when it was not truncated.
    labels: [T] a copy of input_ids, with IGNORE_INDEX on the prompt when `train_on_inputs=False`.
    """

    input_ids: list[int]
    labels: list[int]


def tokenize_batch(tokenizer: Tokenizer, prompts: Sequence[str], fulls: Sequence[str], cfg: DataConfig,
                   allow_empty: bool = False) -> list[TokenizedExample]:
    """`tokenize_example` over many rows, with one tokenizer call per list of texts.

    Args:
        allow_empty: return an empty example for a text that tokenises to no tokens instead of raising, so a
            caller can name the file and row itself.

    Raises:
        UserError: a text tokenises to no tokens (upstream would fail on `input_ids[-1]`) and not allow_empty.
    """
    if not fulls:  # HF tokenizers fail on an empty batch (an IndexError inside transformers)
        return []
    full_ids = tokenizer.encode_batch(fulls, max_length=cfg.cutoff_len)
    prompt_lens = None
    if not cfg.train_on_inputs:
        # Upstream tokenises the prefix with the same truncation and without EOS; its length is the mask
        # count. The prefix ends in spaces, so this can be one off the true boundary: kept as upstream.
        prompt_lens = [len(ids) for ids in tokenizer.encode_batch(prompts, max_length=cfg.cutoff_len)]
    if cfg.add_eos and tokenizer.eos_id is None:
        raise UserError("data.add_eos: the tokenizer has no EOS token")
    out = []
    for i, ids in enumerate(full_ids):
        if not ids:
            if not allow_empty:
                raise UserError(f"the training text tokenises to no tokens: {fulls[i][:60]!r}")
            out.append(TokenizedExample([], []))
            continue
        ids = list(ids)
        # README §2: EOS only if not already there AND the sequence is shorter than the cutoff, so a
        # truncated example gets none.
        if cfg.add_eos and ids[-1] != tokenizer.eos_id and len(ids) < cfg.cutoff_len:
            ids.append(tokenizer.eos_id)
        labels = list(ids)
        if prompt_lens is not None:
            # Upstream's `[-100] * n + labels[n:]` would make labels longer than the ids if the prefix had more
            # tokens than the (truncated) full text; clamping keeps both the same length.
            n = min(prompt_lens[i], len(labels))
            labels[:n] = [IGNORE_INDEX] * n
        out.append(TokenizedExample(ids, labels))
    return out


def tokenize_example(tokenizer: Tokenizer, prompt: str, full: str, cfg: DataConfig) -> TokenizedExample:
    """Tokenises one training text as upstream `generate_and_tokenize_prompt` does (README §2).

    Args:
        tokenizer: from `load_tokenizer`.
        prompt: the template with an empty output (`PromptSplit.prompt`); used only with
            `cfg.train_on_inputs=False`.
        full: the whole training text (`PromptSplit.full`).
        cfg: uses `cutoff_len`, `add_eos` and `train_on_inputs`.

    Returns:
        input_ids and labels, each [T] with T <= cfg.cutoff_len.
    """
    return tokenize_batch(tokenizer, [prompt], [full], cfg)[0]
