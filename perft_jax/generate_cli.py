"""`perft-generate`: replies from a base (+ PERFT adapters) to one prompt, a file of prompts, or a chat on stdin.

    perft-generate model.checkpoint=runs/demo/base adapters=runs/demo/run/best_adapters \\
        --prompt "Is 47 greater than 12? Answer true or false."

The settings are `GenerateConfig` (a `--config` YAML file and `key=value` overrides, `--help` lists every key);
the replies are `perft_jax.generate`'s (perft_jax/generation.py), so the command and the Python API agree.
Bad input (a missing directory or file, no prompt, a bad setting) ends with one line `error: ...` and exit code 2.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Literal

from perft_jax import generation
from perft_jax.build import build_model, load_base_tokenizer
from perft_jax.config import ModelSection
from perft_jax.config_help import config_command_parser
from perft_jax.config_parsing import apply_overrides, from_dict, load_yaml
from perft_jax.data.tokenize import Tokenizer
from perft_jax.errors import UserError, run_cli
from perft_jax.eval import sampling
from perft_jax.io import write_text_atomic
from perft_jax.models.decoder import MoeForCausalLM
from perft_jax.perft.adapter_files import load_adapters

DESCRIPTION = """\
Generate from, or chat with, a converted base (+ PERFT adapters): one of
  perft-generate model.checkpoint=DIR [adapters=DIR] --prompt TEXT          (prints the reply)
  perft-generate model.checkpoint=DIR [adapters=DIR] prompts_file=FILE [output=out.jsonl]
  perft-generate model.checkpoint=DIR [adapters=DIR] interactive=true       (a chat on stdin; /quit or EOF ends)
The prompt goes into the LLM-Adapters training template (template=alpaca, what PERFT models are fine-tuned with)
unless template=none (raw text), chat (the tokenizer's chat template) or auto (chat when there is one);
"response_prefix=the correct answer is" starts every reply in the prompt, as PERFT's commonsense evaluation does.
Greedy by default; num_beams=4 for beam search, do_sample=true [temperature=.. top_k=.. top_p=.. seed=..] to sample.
Relative paths are relative to the working directory."""


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """perft-generate's settings.

    Attributes:
        template: the prompt template: alpaca (the LLM-Adapters training template, what PERFT models are fine-tuned
            with), none (the raw text), chat (the tokenizer's chat template) or auto (chat when the tokenizer has
            one, else alpaca).
    """

    model: ModelSection = ModelSection()
    adapters: str = ""  # an adapter directory (e.g. runs/demo/run/best_adapters); empty: the base alone
    prompt: str = ""  # one prompt; its reply is printed (--prompt TEXT sets it verbatim, not read as YAML)
    prompts_file: str = ""  # a text file (one prompt a line; empty lines skipped) or a .json list of strings
    output: str = ""  # with prompts_file: write {"prompt", "reply"} JSON lines here; empty: print them
    interactive: bool = False  # chat on stdin: multi-turn under a chat template, else each line a fresh prompt
    template: Literal[generation.TEMPLATE_NAMES] = "alpaca"
    response_prefix: str = ""  # the start of every reply, put in the prompt (e.g. "the correct answer is")
    max_new_tokens: int = generation.DEFAULT_MAX_NEW_TOKENS  # the most tokens per reply (a reply also ends at EOS)
    num_beams: int = 1  # 1: greedy (or sampling); N > 1: beam search with N beams, as HF generate
    do_sample: bool = False  # sample instead of the argmax, after temperature, top-k and top-p (HF's order)
    temperature: float = sampling.DEFAULT_TEMPERATURE  # sampling: logits divided by this (> 0)
    top_k: int = sampling.DEFAULT_TOP_K  # sampling: keep the k most probable tokens; 0: all
    top_p: float = sampling.DEFAULT_TOP_P  # sampling: keep the most probable tokens holding this mass; 1: all
    seed: int = 0  # sampling: the PRNG seed (in the chat loop, turn t uses seed + t)
    batch_size: int = 8  # prompts decoded together (prompts_file)

    def validate_config(self, prefix: str = "") -> GenerateConfig:
        modes = [key for key in ("prompt", "prompts_file", "interactive") if getattr(self, key)]
        if len(modes) != 1:
            given = f"got {' and '.join(modes)}" if modes else "got none"
            raise UserError(f"give one of --prompt TEXT, prompts_file=FILE or interactive=true ({given})")
        if self.output and not self.prompts_file:
            raise UserError("output: writes the replies to prompts_file's prompts; set prompts_file=FILE too")
        for key in ("max_new_tokens", "num_beams", "batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}: expected a positive integer, got {getattr(self, key)!r}")
        if self.do_sample and self.num_beams > 1:
            raise UserError(f"num_beams: do_sample samples with one beam, got num_beams={self.num_beams}")
        sampling.check_settings(self.temperature, self.top_k, self.top_p, self.seed)
        return self

    def options(self) -> dict:
        """The keyword arguments of `generate_conversations` (`perft_jax.generate` takes the same)."""
        keys = ("template", "response_prefix", "max_new_tokens", "num_beams", "do_sample", "temperature", "top_p",
                "top_k", "seed", "batch_size")
        return {key: getattr(self, key) for key in keys}


def read_prompts(path: str) -> list[str]:
    """The prompts of a file: a JSON list of strings (`.json`), else one prompt per non-empty line."""
    file = pathlib.Path(path)
    try:
        text = file.read_text()
    except OSError as e:
        raise UserError(f"prompts_file: cannot read {path!r} ({e.strerror or e})") from None
    if file.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(prompts, list):
            raise UserError(f"{path}: expected a JSON list of prompt strings")
        for i, item in enumerate(prompts):
            if not isinstance(item, str):
                raise UserError(f"{path}: item {i} is not a string: {item!r}")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _check_output(path: str) -> None:
    """Refuse an output that cannot be written, before any generation."""
    out = pathlib.Path(path)
    if out.is_dir():
        raise UserError(f"output: {path!r} is a directory")
    if not out.parent.is_dir():
        raise UserError(f"output: no such directory {str(out.parent)!r}")


def _write_jsonl(path: str, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def load(cfg: GenerateConfig) -> tuple[MoeForCausalLM, Tokenizer]:
    """The model of the config (its adapters loaded) and its tokenizer; the tokenizer first, so that a template it
    cannot serve fails before the model loads."""
    if cfg.adapters and not pathlib.Path(cfg.adapters).is_dir():
        raise UserError(f"adapters: no such directory {cfg.adapters!r}")
    tokenizer = load_base_tokenizer(cfg.model)
    generation.resolve_template(cfg.template, tokenizer)
    model = build_model(cfg.model)
    if cfg.adapters:
        load_adapters(model, cfg.adapters)
    return model, tokenizer


def _user(text: str) -> list[dict]:
    """A conversation of one user message."""
    return [{"role": "user", "content": text}]


def _one(cfg: GenerateConfig, model: MoeForCausalLM, tokenizer: Tokenizer, prompts: list[str]) -> None:
    print(generation.generate_conversations(model, tokenizer, [_user(prompts[0])], **cfg.options())[0])


def _file(cfg: GenerateConfig, model: MoeForCausalLM, tokenizer: Tokenizer, prompts: list[str]) -> None:
    replies = generation.generate_conversations(model, tokenizer, [_user(p) for p in prompts], **cfg.options())
    rows = [{"prompt": p, "reply": r} for p, r in zip(prompts, replies)]
    if cfg.output:
        _write_jsonl(cfg.output, rows)
        print(f"{len(rows)} replies written to {cfg.output}", file=sys.stderr)
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))


def _chat(cfg: GenerateConfig, model: MoeForCausalLM, tokenizer: Tokenizer, prompts: list[str]) -> None:
    """Read a line, print the reply, until `/quit` or the end of stdin (`prompts` is unused); the history is kept
    under a multi-turn template only."""
    template = generation.resolve_template(cfg.template, tokenizer)
    multi_turn = generation.TEMPLATES[template].multi_turn
    print(f"chatting ({template} template, {'multi-turn' if multi_turn else 'each line a fresh prompt'}); "
          "/quit or end of input ends", file=sys.stderr)
    history: list[dict] = []
    turn = 0
    while True:
        if sys.stdin.isatty():  # a prompt marker for a person typing, none in a pipe's output
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        text = line.rstrip("\n")
        if not line or text.strip() == "/quit":
            break
        if not text.strip():
            continue
        conversation = [*history, *_user(text)] if multi_turn else _user(text)
        options = {**cfg.options(), "template": template, "seed": cfg.seed + turn}
        reply = generation.generate_conversations(model, tokenizer, [conversation], **options)[0]
        print(reply, flush=True)
        turn += 1
        if multi_turn:
            history = [*conversation, {"role": "assistant", "content": reply}]


MODES = {"prompt": _one, "prompts_file": _file, "interactive": _chat}


def parse_config(argv: list[str] | None) -> GenerateConfig:
    """The config of a command line: `--config FILE`, `key=value` overrides, then `--prompt TEXT`."""
    parser = config_command_parser("perft-generate", DESCRIPTION, GenerateConfig)
    parser.add_argument("-p", "--prompt", help="the prompt, verbatim (a prompt=... override is read as YAML, where "
                                               "'a: b' is a mapping)")
    args = parser.parse_intermixed_args(argv)  # --prompt may come after key=value
    data = apply_overrides(load_yaml(args.config) if args.config else {}, args.overrides)
    if args.prompt is not None:
        data["prompt"] = args.prompt
    return from_dict(GenerateConfig, data, "")


def run(cfg: GenerateConfig) -> None:
    """Check the inputs, load the model, generate as the mode says."""
    # Inputs first: a bad prompts file or output path fails before the model loads.
    prompts = read_prompts(cfg.prompts_file) if cfg.prompts_file else [cfg.prompt]
    if cfg.output:
        _check_output(cfg.output)
    model, tokenizer = load(cfg)
    mode = next(key for key in MODES if getattr(cfg, key))
    MODES[mode](cfg, model, tokenizer, prompts)


def main(argv: list[str] | None = None) -> int:
    """`perft-generate [--config FILE] [key=value ...] [--prompt TEXT]`; the exit code (2: bad input)."""
    return run_cli(lambda: run(parse_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
