"""Keep-best adapters on resume: a damaged or missing `best_adapters/` is reported and set aside, never fatal.

The run checkpoint records the best validation loss and its step; `best_adapters/` holds that step's adapters
(written before the checkpoint that records them). When the directory cannot be read back (a truncated weights
file, a broken config: a node lost mid-write, a flaky file system), the resumed run says so in one line, moves it
to `best_adapters.damaged-<n>` for inspection and starts keep-best over at its next validation: otherwise the run
would end pointing at adapters that do not load.
"""
from __future__ import annotations

import pathlib
import sys
from typing import Any

import safetensors
import safetensors.numpy

from perft_jax.errors import UserError
from perft_jax.io import set_aside
from perft_jax.perft.adapter_configs import WEIGHTS_NAME, read_adapter_config

NO_BEST = {"val_loss": None, "step": None}


def adapter_dir_problem(adapter_dir: pathlib.Path) -> str | None:
    """Why `adapter_dir` cannot be read back (missing, unreadable config, truncated weights), or None."""
    if not adapter_dir.is_dir():
        return "missing"
    weights = adapter_dir / WEIGHTS_NAME
    try:
        read_adapter_config(adapter_dir)
        safetensors.numpy.load_file(weights)  # reads every tensor: a truncated file fails here
    except UserError as e:
        return str(e)
    except (safetensors.SafetensorError, OSError) as e:
        return f"{weights}: {e}"
    return None


def resumed_best(best_dir: pathlib.Path, best: dict[str, Any], is_writer: bool) -> dict[str, Any]:
    """The keep-best record a resumed run goes on with: `best` when its adapters read back, else `NO_BEST`
    (every process decides alike, from the same files; process 0 reports and sets the directory aside)."""
    if not best.get("step"):
        return best
    problem = adapter_dir_problem(best_dir)
    if problem is None:
        return best
    if is_writer:
        kept = f"moved to {set_aside(best_dir).name} for inspection; " if best_dir.exists() else ""
        print(f"warning: {best_dir}: the keep-best adapters of step {best['step']} do not read back ({problem}); "
              f"{kept}keep-best starts over at the next validation", file=sys.stderr)
    return dict(NO_BEST)
