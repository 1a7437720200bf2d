"""Text in, text out: `perft_jax.generate` answers prompts with a base model, with or without PERFT adapters.

    model = perft_jax.load_adapters(perft_jax.load_model("runs/demo/base"), "runs/demo/run/best_adapters")
    perft_jax.generate(model, "runs/demo/base", "Is 47 greater than 12? Answer true or false.",
                       response_prefix="the correct answer is")        # -> 'the correct answer is true'

Each prompt is put in a template (`TEMPLATES`), tokenized, decoded by `eval.generate.generate` (greedy, sampling
or beam search over the KV cache) in length-sorted batches, and the new tokens are decoded back to text:

- "alpaca" (the default): the LLM-Adapters training template up to `### Response:` (data/prompts.py), the one
  PERFT models are fine-tuned with; the reply is the text after it, stripped;
- "none": the raw text, continued; the reply is the continuation as generated;
- "chat": the tokenizer's chat template (transformers' `apply_chat_template` with the generation prompt), for a
  tokenizer folder that has one; the reply is stripped;
- "auto": "chat" when the tokenizer has a chat template, else "alpaca".

"alpaca" and "none" are single-turn (a conversation's last message is the instruction); "chat" is multi-turn.
A `response_prefix` starts every reply in the prompt itself (the model continues it), as PERFT's commonsense
evaluation starts each with "the correct answer is" (spec/PERFT.md §7); the reply includes it.
"""
from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from perft_jax.data.prompts import train_prompt
from perft_jax.data.tokenize import Tokenizer, load_tokenizer
from perft_jax.errors import UserError
from perft_jax.eval import generate as decoding
from perft_jax.eval import sampling
from perft_jax.models.decoder import MoeForCausalLM

Message = Mapping[str, str]  # {"role": "user" | "assistant" | "system", "content": text}, as HF chat templates
DEFAULT_MAX_NEW_TOKENS = 128
# Prompt-length bucket: batches whose longest prompt rounds up to the same multiple of 64 share a compilation.
PAD_TO_MULTIPLE_OF = 64


class Template(NamedTuple):
    """A prompt template: how a conversation becomes prompt text, and how the reply is read back."""

    render: Callable[[Tokenizer, Sequence[Message], str], str]  # the prompt of a conversation and response prefix
    multi_turn: bool  # False: only the last message counts
    strip: bool  # strip the decoded reply (it starts with the newline and indent after `### Response:`)


def _alpaca(tokenizer: Tokenizer, conversation: Sequence[Message], response_prefix: str) -> str:
    """The training template with the response prefix as its output; without one, up to `### Response:` only.

    Not up to the newline and 16-space indent that follow the marker in training: byte-level BPE tokenizes that
    whitespace together with the output's first word ("\\n" + 15 spaces, then " the"), so a prompt ending in it
    would end in tokens no training row has. A prompt ending at the marker, or in a prefix of the output, is a
    token prefix of the training rows (a newline starts a new pre-token), and the model goes on from there.
    """
    return train_prompt(conversation[-1]["content"], response_prefix).rstrip()


def _raw(tokenizer: Tokenizer, conversation: Sequence[Message], response_prefix: str) -> str:
    return conversation[-1]["content"] + response_prefix


def _chat(tokenizer: Tokenizer, conversation: Sequence[Message], response_prefix: str) -> str:
    hf = chat_tokenizer(tokenizer)  # not None: `resolve_template` checked
    text = hf.apply_chat_template([dict(m) for m in conversation], tokenize=False, add_generation_prompt=True)
    # Templates spell the BOS token out; a tokenizer that adds BOS itself would then start with two.
    bos = hf.bos_token
    if bos and text.startswith(bos) and tokenizer.bos_id is not None and tokenizer.encode("")[:1] == [tokenizer.bos_id]:
        text = text[len(bos):]
    return text + response_prefix


TEMPLATES: dict[str, Template] = {
    "alpaca": Template(_alpaca, multi_turn=False, strip=True),
    "none": Template(_raw, multi_turn=False, strip=False),
    "chat": Template(_chat, multi_turn=True, strip=True),
}
TEMPLATE_NAMES = (*TEMPLATES, "auto")


@functools.lru_cache(maxsize=8)
def _hf_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)


def chat_tokenizer(tokenizer: Tokenizer):
    """transformers' tokenizer of `tokenizer`'s folder when that has a chat template (it renders the template),
    else None (a bare tokenizer.json or SentencePiece file has none)."""
    source = getattr(tokenizer, "source", None)
    if not source or not pathlib.Path(source).is_dir():
        return None
    hf = _hf_tokenizer(str(pathlib.Path(source).resolve()))
    return hf if getattr(hf, "chat_template", None) else None


def resolve_template(name: str, tokenizer: Tokenizer) -> str:
    """The template `name` stands for with this tokenizer ("auto": "chat" when it has a chat template).

    Raises:
        UserError: an unknown name, or "chat" for a tokenizer without a chat template.
    """
    if name not in TEMPLATE_NAMES:
        raise UserError(f"template: expected one of {', '.join(TEMPLATE_NAMES)}, got {name!r}")
    has_chat = name in ("chat", "auto") and chat_tokenizer(tokenizer) is not None
    if name == "chat" and not has_chat:
        raise UserError(f"template 'chat': the tokenizer {getattr(tokenizer, 'source', '')!r} has no chat template "
                        "(use template=alpaca, the PERFT training template, or template=none)")
    return "chat" if has_chat else "alpaca" if name == "auto" else name


def as_tokenizer(tokenizer: Tokenizer | str | os.PathLike) -> Tokenizer:
    """A tokenizer as given, or loaded from a path / hub name with `load_tokenizer`."""
    return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer


def _new_text(tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text the new tokens add to the prompt's: decoded together with the prompt, so a word split across the
    boundary or a SentencePiece leading space comes out as in the whole sequence."""
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    whole = tokenizer.decode(prompt + new, skip_special_tokens=True)
    return whole[len(before):] if whole.startswith(before) else tokenizer.decode(new, skip_special_tokens=True)


def _reply_start(without: str, prompt: str, response_prefix: str) -> str:
    """The text a prompt adds for the response prefix (the prompt without a prefix is where the reply starts)."""
    return prompt[len(without):] if prompt.startswith(without) else response_prefix


def generate_conversations(model: MoeForCausalLM, tokenizer: Tokenizer | str | os.PathLike,
                           conversations: Sequence[Sequence[Message]], *, template: str = "alpaca",
                           max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, num_beams: int = 1, do_sample: bool = False,
                           temperature: float = sampling.DEFAULT_TEMPERATURE, top_p: float = sampling.DEFAULT_TOP_P,
                           top_k: int = sampling.DEFAULT_TOP_K, seed: int = 0, batch_size: int = 8,
                           response_prefix: str = "") -> list[str]:
    """The model's next reply in each conversation (see `generate` for the options); what `perft-generate`'s chat
    loop calls with the whole history under a multi-turn template."""
    tokenizer = as_tokenizer(tokenizer)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if tokenizer.eos_id is None:
        raise UserError(f"the tokenizer {getattr(tokenizer, 'source', '')!r} has no EOS token to stop generation at")
    chosen = TEMPLATES[resolve_template(template, tokenizer)]
    prompts = [chosen.render(tokenizer, c, response_prefix) for c in conversations]
    # What the prompt holds of the reply already: the prefix, as the template spells it (alpaca: after the indent).
    starts = [_reply_start(chosen.render(tokenizer, c, ""), p, response_prefix) for c, p in zip(conversations, prompts)]
    prompt_ids = tokenizer.encode_batch(prompts)
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise UserError(f"prompt {i} tokenizes to no tokens: nothing to continue")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # batches of similar lengths
    replies: list[str] = [""] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        try:
            new = decoding.generate(model, [prompt_ids[i] for i in rows], max_new_tokens, tokenizer.eos_id, pad_id,
                                    num_beams, pad_to_multiple_of=PAD_TO_MULTIPLE_OF,
                                    pad_batch_to=min(batch_size, len(order)), do_sample=do_sample,
                                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, streams=rows)
        except decoding.PromptTooLongError as e:
            row = rows[e.row]
            raise UserError(f"prompt {row} has {len(prompt_ids[row])} tokens; with max_new_tokens={max_new_tokens} "
                            f"it exceeds the model's max_position_embeddings "
                            f"({model.config.max_position_embeddings})") from None
        for i, tokens in zip(rows, new):
            text = starts[i] + _new_text(tokenizer, prompt_ids[i], tokens)
            replies[i] = text.strip() if chosen.strip else text
    return replies


def generate(model: MoeForCausalLM, tokenizer: Tokenizer | str | os.PathLike, prompts: str | Sequence[str], *,
             template: str = "alpaca", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, num_beams: int = 1,
             do_sample: bool = False, temperature: float = sampling.DEFAULT_TEMPERATURE,
             top_p: float = sampling.DEFAULT_TOP_P, top_k: int = sampling.DEFAULT_TOP_K, seed: int = 0,
             batch_size: int = 8, response_prefix: str = "") -> str | list[str]:
    """The model's reply to each prompt: text in, text out.

    Args:
        model: a base (`load_model`), with or without adapters (`load_adapters`).
        tokenizer: a tokenizer from `perft_jax.data.tokenize.load_tokenizer`, or the path / hub name to load one
            from (a converted base's folder carries its tokenizer).
        prompts: one prompt, or a list of them.
        template: "alpaca" (the LLM-Adapters training template PERFT models are fine-tuned with), "none" (raw
            text), "chat" (the tokenizer's chat template) or "auto" (chat when there is one, else alpaca).
        max_new_tokens: the most tokens per reply (it also ends at the tokenizer's EOS).
        num_beams: 1: greedy or sampling; N > 1: beam search with N beams (as HF generate, token for token).
        do_sample: sample each token instead of the argmax, after temperature, top-k and top-p (HF's warpers, in
            HF's order and with its defaults: top_k 50, top_p 1, temperature 1).
        temperature, top_p, top_k: sampling only; top_k=0 or top_p=1 turn that filter off.
        seed: sampling only: the draws depend on the seed and the prompt's position in `prompts`, nothing else.
        batch_size: prompts decoded together (sorted by length).
        response_prefix: the start of every reply, put in the prompt for the model to continue (e.g. "the
            correct answer is", as PERFT's commonsense evaluation does); the reply begins with it.

    Returns:
        The reply (a str for a str prompt, a list in prompt order for a list): the decoded new text, special
        tokens skipped; stripped for the alpaca and chat templates.

    Raises:
        UserError: no prompts or a non-text one, an unknown template, a chat template the tokenizer lacks, a
            prompt too long for the model, bad decoding settings.
    """
    single = isinstance(prompts, str)
    items = [prompts] if single else list(prompts)
    if not items:
        raise UserError("generate: no prompts")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise UserError(f"generate: prompt {i} is a {type(item).__name__}, not text")
    replies = generate_conversations(
        model, tokenizer, [[{"role": "user", "content": p}] for p in items], template=template,
        max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample, temperature=temperature,
        top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size, response_prefix=response_prefix)
    return replies[0] if single else replies


__all__ = ["TEMPLATES", "TEMPLATE_NAMES", "chat_tokenizer", "generate", "generate_conversations", "resolve_template"]
