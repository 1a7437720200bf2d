"""Evaluation: LLM-Adapters answer extraction and scoring (shared/data/llm_adapters/README.md §3-§5)."""
from perft_jax.eval.scoring import (
    BENCHMARKS,
    COMMONSENSE_BENCHMARKS,
    MATH_BENCHMARKS,
    Benchmark,
    extract_answer,
    extract_response,
    get_benchmark,
    is_correct,
    macro_average,
    score,
)

__all__ = [
    "BENCHMARKS",
    "COMMONSENSE_BENCHMARKS",
    "MATH_BENCHMARKS",
    "Benchmark",
    "extract_answer",
    "extract_response",
    "get_benchmark",
    "is_correct",
    "macro_average",
    "score",
]
