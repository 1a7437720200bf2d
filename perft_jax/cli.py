"""The commands: `perft-train` and `perft-eval` (config-driven, here), and `python -m perft_jax COMMAND` for all five.

`perft-train` (also `python train.py`) and `perft-eval` read `--config FILE key=value ...` (their `--help` lists
every config key, from the config dataclasses). `python -m perft_jax` (and `python -m perft_jax.cli`) dispatches
`train | eval | generate | convert | params` to the installed commands' entry points (`COMMANDS`, the same table as
pyproject.toml's `[project.scripts]`).

Bad input (a config key, a file, a data row) ends with one line `error: ...` and exit code 2; a diverged
run (NaN / inf loss) with exit code 1 and the last good checkpoint intact. In multi-host runs only process 0
prints the config, reports and results; errors are printed by every process that hits them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from perft_jax.config import Config
from perft_jax.config_help import config_command_parser
from perft_jax.errors import UserError, cli_error_line

TRAIN_DESCRIPTION = """\
Fine-tune PERFT adapters on a frozen MoE base: perft-train --config FILE [key=value ...].
Without --config: the embedded demo (a tiny OLMoE-shaped base, a generated true/false task, PERFT-R fine-tuning
and accuracy before / after, all under runs/demo/). Re-running the same command resumes from the run's newest
checkpoint. mode=eval evaluates instead, as perft-eval does."""

EVAL_DESCRIPTION = """\
Evaluate a base (+ eval.adapters) on LLM-Adapters benchmarks by generation and scoring:
  perft-eval --config FILE eval.adapters=runs/x/best_adapters [eval.benchmarks=[boolq,piqa]] [eval.data_dir=DIR]
Without --config: the demo's base on the demo's test set (perft-eval eval.adapters=runs/demo/run/best_adapters).
Writes eval.json (accuracies, every generation) and eval_config.json to train.output_dir, and the accuracies to
its metrics.jsonl / TensorBoard / W&B at the adapters' training step."""

# Subcommand -> (entry point "module:function" taking argv, one-line help). pyproject.toml installs each as
# perft-<name> (tests/test_commands.py checks the two agree).
COMMANDS = {
    "train": ("perft_jax.cli:train_main", "fine-tune PERFT adapters (without --config: the embedded demo)"),
    "eval": ("perft_jax.cli:eval_main", "evaluate a base (+ adapters) on LLM-Adapters benchmarks"),
    "generate": ("perft_jax.generate_cli:main", "generate from, or chat with, a base (+ adapters)"),
    "convert": ("perft_jax.convert.cli:main", "convert a Hugging Face checkpoint (or --export one back)"),
    "params": ("perft_jax.params:main", "parameter counts and per-device memory plan of a config"),
}


def _run(config: str | None, overrides: list[str]) -> int:
    """Load the config (none: the demo), then train or evaluate as its `mode` says."""
    from perft_jax.train.loop import TrainingDiverged

    try:
        if config is None:
            from perft_jax import demo

            return demo.run_demo(overrides)
        from perft_jax.build import load_run_config
        from perft_jax.distributed import initialize, is_main_process

        cfg = load_run_config(config, overrides)
        initialize(cfg.mesh.distributed)  # before anything touches a device; then only process 0 prints
        if is_main_process():
            print(cfg.to_json())
        if cfg.mode == "eval":
            from perft_jax.eval.pipeline import run_evaluation

            run_evaluation(cfg)
        else:
            from perft_jax.train.loop import run_training

            run_training(cfg)
    except (UserError, OSError) as e:
        line = cli_error_line(e)  # an OSError without a named file, or of another kind, is a bug: traceback
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def train_main(argv: list[str] | None = None, prog: str = "perft-train") -> int:
    """`perft-train [--config FILE] [key=value ...]`; the exit code."""
    args = config_command_parser(prog, TRAIN_DESCRIPTION, Config).parse_args(argv)
    return _run(args.config, args.overrides)


def eval_main(argv: list[str] | None = None, prog: str = "perft-eval") -> int:
    """`perft-eval [--config FILE] [key=value ...]`: `perft-train` with mode=eval; the exit code."""
    args = config_command_parser(prog, EVAL_DESCRIPTION, Config).parse_args(argv)
    other = [item for item in args.overrides if item.startswith("mode=") and item != "mode=eval"]
    if other:
        print(f"error: {other[0]}: {prog} evaluates (mode=eval); train with perft-train", file=sys.stderr)
        return 2
    return _run(args.config, ["mode=eval", *args.overrides])


def _parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in COMMANDS)
    table = "\n".join(f"  {name:<{width}}  {help_text} (perft-{name})" for name, (_, help_text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="python -m perft_jax", usage="%(prog)s [-h] COMMAND [args ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="perft-jax: PERFT fine-tuning of MoE LLMs. Each command is also installed as perft-COMMAND.",
        epilog=f"commands:\n{table}\n\n`python -m perft_jax COMMAND --help` lists the command's options "
               "(and, for train and eval, every config key).")
    # Only for --help and errors: main hands everything after COMMAND to the command itself.
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help=", ".join(COMMANDS))
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m perft_jax COMMAND [args ...]`: runs the command's entry point; its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:  # --help, or a missing / unknown command: argparse says so
        _parser().parse_args(argv[:1])
    module, function = COMMANDS[argv[0]][0].split(":")
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
