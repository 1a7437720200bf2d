"""Entry point of `train.py`: parse `--config FILE key=value ...`, dispatch to training or evaluation.

Bad input (a config key, a file, a data row) ends with one line `error: ...` and exit code 2; a diverged
run (NaN / inf loss) with exit code 1 and the last good checkpoint intact. In multi-host runs only process 0
prints the config, reports and results; errors are printed by every process that hits them.
"""
from __future__ import annotations

import sys

from perft_jax.config import Config
from perft_jax.config_help import config_command_parser
from perft_jax.errors import UserError

DESCRIPTION = ("PERFT fine-tuning and evaluation of MoE LLMs. Without --config: the embedded demo "
               "(perft_jax/demo.py). Re-running the same command resumes from the run's newest checkpoint.")


def train_main(argv: list[str] | None = None) -> int:
    args = config_command_parser("train.py", DESCRIPTION, Config).parse_args(argv)
    from perft_jax.train.loop import TrainingDiverged

    try:
        if args.config is None:
            from perft_jax import demo

            return demo.run_demo(args.overrides)
        from perft_jax.build import load_run_config
        from perft_jax.distributed import initialize, is_main_process

        cfg = load_run_config(args.config, args.overrides)
        initialize(cfg.mesh.distributed)  # before anything touches a device; then only process 0 prints
        if is_main_process():
            print(cfg.to_json())
        if cfg.mode == "eval":
            from perft_jax.eval.pipeline import run_evaluation

            run_evaluation(cfg)
        else:
            from perft_jax.train.loop import run_training

            run_training(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
