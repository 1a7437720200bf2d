"""Data: LLM-Adapters prompt templates (shared/data/llm_adapters/README.md §2, §3; PERFT.md §7)."""
from perft_jax.data.prompts import (
    PromptSplit,
    commonsense_eval_prompt,
    eval_prompt,
    math_eval_prompt,
    record_prompt_split,
    train_prompt,
    train_prompt_split,
)

__all__ = [
    "PromptSplit",
    "commonsense_eval_prompt",
    "eval_prompt",
    "math_eval_prompt",
    "record_prompt_split",
    "train_prompt",
    "train_prompt_split",
]
