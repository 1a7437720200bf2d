"""Hub names: a Hugging Face repo id (`allenai/OLMoE-1B-7B-0924`) wherever a local directory is expected.

One rule everywhere (`--hf-dir`, `model.tokenizer`, `eval.data_dir`, and `data.train_files` in data/dataset.py):
a path that exists is that path; otherwise a string shaped `namespace/name` (huggingface_hub's repo-id rules) is a
hub name. `./org/name` always means the path.

    located = locate("allenai/OLMoE-1B-7B-0924", allow_patterns=model_patterns())  # a snapshot in the hub cache
    located.path, located.repo_id, located.commit

Hub names resolve with `huggingface_hub.snapshot_download`, which keeps files in the local cache (HF_HUB_CACHE, else
HF_HOME/hub) and uses that cache alone under HF_HUB_OFFLINE=1 or when the hub cannot be reached. Only the files
perft-jax reads are downloaded: config, safetensors and index, tokenizer and generation config; pickle weights
(`pytorch_model*.bin`) only when asked for. A miss is a one-line UserError naming the command that fetches it.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import huggingface_hub
from huggingface_hub import errors as hub_errors
from huggingface_hub.utils import validate_repo_id

from perft_jax.errors import UserError

GENERATION_CONFIG = "generation_config.json"
# What `PreTrainedTokenizer(Fast).save_pretrained` writes for the tokenizers of OLMoE / Mixtral-style models
# (fast JSON, BPE vocab/merges, SentencePiece model) and its chat template, in either of its two file forms.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
SAFETENSORS_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


def model_patterns(allow_pickle: bool = False) -> list[str]:
    """`allow_patterns` for a model repo: what the converter reads, pickles only with `allow_pickle`."""
    return ["config.json", GENERATION_CONFIG, *TOKENIZER_FILES, *SAFETENSORS_PATTERNS,
            *(PICKLE_PATTERNS if allow_pickle else ())]


def tokenizer_patterns() -> list[str]:
    """`allow_patterns` for a tokenizer: its files, plus config.json (AutoTokenizer may read the model type)."""
    return ["config.json", GENERATION_CONFIG, *TOKENIZER_FILES]


def tokenizer_files(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The tokenizer files (`TOKENIZER_FILES`) present in `directory`."""
    directory = pathlib.Path(directory)
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def is_repo_id(value: object) -> bool:
    """True for a string shaped `namespace/name` that huggingface_hub accepts as a repo id."""
    if not isinstance(value, str) or value.count("/") != 1 or value.startswith(("/", "~")):
        return False
    try:
        validate_repo_id(value)
    except hub_errors.HFValidationError:
        return False
    return True


def is_hub_name(value: str | os.PathLike) -> bool:
    """The rule above: not an existing path, and shaped like a repo id."""
    return not pathlib.Path(value).exists() and is_repo_id(str(value))


@dataclasses.dataclass(frozen=True)
class Located:
    """Where a local-path-or-hub-name argument points.

    Attributes:
        path: the local path, or the snapshot directory in the hub cache.
        repo_id: the hub name it was resolved from; None for a local path.
        commit: the snapshot's commit hash; None for a local path.
    """

    path: pathlib.Path
    repo_id: str | None = None
    commit: str | None = None


def locate(value: str | os.PathLike, *, repo_type: str = "model", revision: str | None = None,
           allow_patterns: Sequence[str] | None = None, what: str = "") -> Located:
    """A local path as is (existing or not: callers report their own missing files), or a hub name's snapshot.

    Args:
        value: a path, or a hub repo id (`namespace/name`).
        repo_type: "model" or "dataset".
        revision: a branch, tag or commit of the hub repo (default: main); refused for a local path.
        allow_patterns: the files to download (glob patterns); the cache's snapshot is used as is offline.
        what: the option or config key, for the revision error.

    Raises:
        UserError: a revision with a local path, or a hub name that cannot be resolved (one line, saying what to do).
    """
    if not is_hub_name(value):
        if revision:
            raise UserError(f"{what or value}: a revision ({revision!r}) selects a hub snapshot, but {str(value)!r} "
                            "is a local path")
        return Located(pathlib.Path(value))
    repo_id = str(value)
    try:
        path = pathlib.Path(huggingface_hub.snapshot_download(
            repo_id, repo_type=repo_type, revision=revision,
            allow_patterns=list(allow_patterns) if allow_patterns is not None else None))
    except (hub_errors.HfHubHTTPError, hub_errors.LocalEntryNotFoundError) as err:
        raise UserError(_explain(err, repo_id, repo_type, revision)) from None
    return Located(path, repo_id, path.name)


def download_command(repo_id: str, repo_type: str = "model", revision: str | None = None) -> str:
    """The `hf` command (huggingface_hub's CLI) that puts this snapshot into the local cache."""
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo_id}{kind}{rev}"


def _not_cached(err: Exception, repo_id: str, repo_type: str, revision: str | None) -> str:
    where = "HF_HUB_OFFLINE=1" if huggingface_hub.is_offline_mode() else \
        f"the hub cannot be reached: {type(err.__cause__ or err).__name__}"
    what = f"revision {revision!r} is not" if revision else "not"
    return (f"{repo_id}: no such local directory, and {what} in the local hub cache ({where}): run "
            f"`{download_command(repo_id, repo_type, revision)}` on a machine with network, or pass a local directory")


def _incomplete(err: Exception, repo_id: str, repo_type: str, revision: str | None) -> str:
    return (f"{repo_id}: the local hub cache holds an incomplete snapshot (an interrupted download): run "
            f"`{download_command(repo_id, repo_type, revision)}` on a machine with network to complete it")


def _gated(err: Exception, repo_id: str, repo_type: str, revision: str | None) -> str:
    return (f"{repo_id}: a gated repository: accept its terms at https://huggingface.co/{repo_id} and log in with "
            "`hf auth login`")


def _missing_repo(err: Exception, repo_id: str, repo_type: str, revision: str | None) -> str:
    return (f"{repo_id}: no such local directory, and no {repo_type} repository of that name on the hub (a private "
            "one needs `hf auth login`)")


def _missing_revision(err: Exception, repo_id: str, repo_type: str, revision: str | None) -> str:
    return f"{repo_id}: no revision {revision!r} on the hub"


def _http(err: Exception, repo_id: str, repo_type: str, revision: str | None) -> str:
    return f"{repo_id}: the hub refused the download ({str(err).splitlines()[0]})"


# Most specific first: the gated error is a RepositoryNotFoundError, an incomplete snapshot a LocalEntryNotFoundError.
_EXPLANATIONS = (
    (hub_errors.IncompleteSnapshotError, _incomplete),
    (hub_errors.LocalEntryNotFoundError, _not_cached),
    (hub_errors.GatedRepoError, _gated),
    (hub_errors.RepositoryNotFoundError, _missing_repo),
    (hub_errors.RevisionNotFoundError, _missing_revision),
    (hub_errors.HfHubHTTPError, _http),
)


def _explain(err: Exception, repo_id: str, repo_type: str, revision: str | None) -> str:
    explain = next(fn for kind, fn in _EXPLANATIONS if isinstance(err, kind))
    return explain(err, repo_id, repo_type, revision)
