"""The embedded default job (`python train.py` with no arguments): PERFT-R end to end on 2 CPU cores.

1. builds a tiny OLMoE-architecture base: random weights written as a Hugging Face directory (with a
   byte-level BPE tokenizer trained on the task's text) and imported with the real converter;
2. generates a small commonsense-format task in the LLM-Adapters JSON layout ("Is 47 greater than 12?"
   -> "the correct answer is true"), a training file and a held-out test file;
3. evaluates the base with freshly attached PERFT-R adapters (generation + the LLM-Adapters scorer),
4. fine-tunes only the adapters with `train.py`'s training loop (validation, checkpoints, metrics),
5. evaluates again with the kept (lowest validation loss) adapters and prints both accuracies beside the
   chance level (50 %: a random true / false).

`mode=eval` (`perft-eval eval.adapters=runs/demo/run/best_adapters`) evaluates the demo's base with the given
adapters (none: the base alone) on the same test file instead.

Everything lives under `runs/demo/` (override with `train.output_dir=...`); the base and data are
reused when present, and an interrupted demo resumes its training run.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from perft_jax.config import Config, EvalConfig, ModelSection, TrainConfig
from perft_jax.config_parsing import apply_overrides, from_dict, to_dict
from perft_jax.data.config import DataConfig
from perft_jax.data.prompts import train_prompt
from perft_jax.eval.scoring import get_benchmark
from perft_jax.io import write_text_atomic
from perft_jax.optim import OptimConfig
from perft_jax.perft.config import PerftConfig

DEMO_DIR = pathlib.Path("runs/demo")
TASK = "synthetic_compare"  # scored with the boolq rules: first "true"/"false" in the response
EOS, PAD = "<|endoftext|>", "<|padding|>"


def make_rows(rng: np.random.Generator, count: int) -> list[dict]:
    """LLM-Adapters commonsense rows: instruction, empty input, `the correct answer is <label>`, answer."""
    rows = []
    for _ in range(count):
        a, b = rng.choice(np.arange(10, 100), size=2, replace=False)
        answer = "true" if a > b else "false"
        rows.append({"instruction": f"Is {a} greater than {b}? Answer true or false.", "input": "",
                     "output": f"the correct answer is {answer}", "answer": answer})
    return rows


def _write_json(path: pathlib.Path, rows: list[dict]) -> None:
    write_text_atomic(path, json.dumps(rows, indent=4))


def build_tokenizer(texts: list[str], out_dir: pathlib.Path, vocab_size: int = 384):
    """A byte-level BPE fitted to the task (exact round trips of the templates' whitespace)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(out_dir))
    return fast


def prepare_assets(root: pathlib.Path, seed: int = 0) -> dict[str, pathlib.Path]:
    """Data files, tokenizer and converted base under `root`; reused when already there."""
    from perft_jax import ModelConfig, export_hf, init_model
    from perft_jax.checkpoint.base import is_base_checkpoint
    from perft_jax.convert.hf_to_jax import convert_hf_to_jax

    paths = {"train": root / "data" / "train.json", "eval_dir": root / "data" / "eval",
             "hf": root / "base_hf", "base": root / "base"}
    if not paths["train"].is_file():
        rng = np.random.default_rng(seed)
        _write_json(paths["train"], make_rows(rng, 3000))
        _write_json(paths["eval_dir"] / TASK / "test.json", make_rows(rng, 300))
    if not is_base_checkpoint(paths["base"]):
        rows = json.loads(paths["train"].read_text())
        texts = [train_prompt(r["instruction"], r["output"]) for r in rows]
        tokenizer = build_tokenizer(texts, paths["hf"])
        vocab = -(-len(tokenizer) // 64) * 64  # padded like real vocabularies (a multiple of 64)
        cfg = ModelConfig(model_type="olmoe", vocab_size=vocab, hidden_size=64, intermediate_size=32,
                          num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, num_experts=8,
                          num_experts_per_tok=2, norm_topk_prob=False, qk_norm=True,
                          max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, moe_backend="capacity")
        export_hf(init_model(cfg, seed=seed), paths["hf"], overwrite=True)
        tokenizer.save_pretrained(str(paths["hf"]))  # beside the weights, as on the hub
        convert_hf_to_jax(paths["hf"], paths["base"], overwrite=True, show_progress=False)
    return paths


def demo_config(root: pathlib.Path, paths: dict, overrides: list[str]) -> Config:
    cfg = Config(
        model=ModelSection(checkpoint=str(paths["base"]), moe_backend="dense"),  # dropless: eval is batch-independent
        perft=PerftConfig(variant="perft_r", adapter="parallel_adapter", bottleneck=32, num_adapters=4, top_k=2),
        # Response-only loss: the answer is one token among ~70 of template and random digits.
        # One length bucket: every step has the same shape, so the step compiles once.
        data=DataConfig(train_files=(str(paths["train"]),), cutoff_len=128, length_buckets=(128,), val_set_size=64,
                        batch_size=32, pad_id=1, train_on_inputs=False),
        optim=OptimConfig(learning_rate=5e-3, warmup_steps=20, schedule="linear"),
        train=TrainConfig(output_dir=str(root / "run"), max_steps=500, eval_every_steps=100, log_every_steps=20),
        eval=EvalConfig(benchmarks=(TASK,), data_dir=str(paths["eval_dir"]), batch_size=100),
    )
    return from_dict(Config, apply_overrides(to_dict(cfg), overrides), "")


def _answered(eval_file: pathlib.Path) -> int:
    """How many generations of the demo task contain a label at all (the rest score as wrong)."""
    rows = json.loads(eval_file.read_text())["generations"][TASK]
    return sum(bool(row["pred"]) for row in rows)


def _train(cfg: Config) -> int:
    """mode=train: accuracy before, fine-tuning, accuracy after (each also logged as the run's eval metrics)."""
    from perft_jax.build import build_model
    from perft_jax.data.tokenize import load_tokenizer
    from perft_jax.eval.pipeline import adapter_step, log_eval_metrics
    from perft_jax.eval.runner import evaluate
    from perft_jax.perft.adapter_files import load_adapters
    from perft_jax.train.loop import run_training

    tokenizer = load_tokenizer(cfg.model.checkpoint)
    run_dir = pathlib.Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    def accuracy(model, name: str, step: int) -> tuple[float, int, int]:
        """(accuracy, replies naming a label, questions) of `model` on the demo's test set."""
        result = evaluate(model, tokenizer, list(cfg.eval.benchmarks), cfg.eval.data_dir,
                          run_dir / f"eval_{name}.json", cfg.eval.batch_size,
                          max_examples=cfg.eval.max_examples or None, num_beams=cfg.eval.num_beams)
        log_eval_metrics(cfg, result, step)
        return result["macro_average"], _answered(run_dir / f"eval_{name}.json"), result["n"][TASK]

    before = accuracy(build_model(cfg.model, cfg.perft, seed=cfg.train.seed), "before", 0)
    summary = run_training(cfg)
    if summary.get("stopped"):
        return 0
    after = accuracy(load_adapters(build_model(cfg.model), summary["adapters"]), "after",
                     adapter_step(summary["adapters"]))
    print(f"\nPERFT-R ({cfg.perft.num_adapters} adapters, top-{cfg.perft.top_k}, D_B={cfg.perft.bottleneck}) "
          f"on {TASK} ({cfg.eval.data_dir}):")
    print(f"  {'':<30}{'accuracy':>10}   answered true/false")
    print(f"  {'chance (a random true/false)':<30}{100 * chance_level():>9.1f}%")
    for name, (acc, answered, count) in (("before fine-tuning", before), ("after fine-tuning", after)):
        print(f"  {name:<30}{100 * acc:>9.1f}%   {answered} of {count}")
    print("  (a reply with neither word counts as wrong, so a model that has not learnt the answer format scores "
          "below chance)")
    print(f"adapters: {summary['adapters']}; metrics: {run_dir / 'metrics.jsonl'}")
    return 0


def _evaluate(cfg: Config) -> int:
    """mode=eval: the demo's base (+ `eval.adapters`, e.g. runs/demo/run/best_adapters) on the demo's test set."""
    from perft_jax.eval.pipeline import run_evaluation

    run_evaluation(cfg)
    print(f"chance level: {100 * chance_level():.1f}% (a random true/false answer)")
    return 0


MODES = {"train": _train, "eval": _evaluate}


def chance_level() -> float:
    """The accuracy of answering at random: one of the task's labels (true / false: 50 %)."""
    return 1 / len(get_benchmark(TASK).labels)


def run_demo(overrides: list[str]) -> int:
    """The demo in the mode its overrides say: `mode=train` (the default) fine-tunes and compares, `mode=eval`
    evaluates the demo base with `eval.adapters`; the run's config.json is written by training only."""
    root = DEMO_DIR
    for item in overrides:  # the demo's own files follow the run directory when it is overridden
        if item.startswith("train.output_dir="):
            root = pathlib.Path(item.split("=", 1)[1]).parent
    cfg = demo_config(root, prepare_assets(root), overrides)
    return MODES[cfg.mode](cfg)
