"""The optional Weights & Biases logger: the `train.wandb` config section and the W&B run it starts.

Off by default (`train.wandb.mode: ""`). `online` streams to the W&B server, `offline` writes the run under
`<output_dir>/wandb/` for a later `wandb sync` (as HF Trainer's `report_to="wandb"` and Levanter's `tracker:
{type: wandb}`, but configured in the run config, not by environment variables). `wandb` is an optional
dependency (`pip install 'perft-jax[wandb]'`), imported only when a mode is set.

The W&B run is the run directory's: its id is kept in `<output_dir>/wandb_run_id`, so a resumed run (and a
later `mode=eval` into the same directory) continues the same W&B run. Each split (`train`, `val`, `eval`)
has its own x axis (`<split>/step`, W&B's `define_metric`), so evaluation results logged after training at
the step of the adapters they score are kept, where W&B would drop a step lower than one already logged.
"""
from __future__ import annotations

import dataclasses
import pathlib
import uuid
from typing import Any, Literal

from perft_jax.errors import UserError
from perft_jax.io import write_text_atomic

RUN_ID_FILE = "wandb_run_id"


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """The `train.wandb` config section.

    Attributes:
        mode: "" (no W&B logging), "online" (stream to the W&B server; needs `wandb login`) or "offline" (write
            the run under <output_dir>/wandb for `wandb sync`).
        project: the W&B project.
        entity: the W&B team or user; empty: your default entity.
        name: the run's display name; empty: the name of `train.output_dir`.
        group: a W&B group for related runs (e.g. the variants of one sweep); empty: none.
        tags: W&B tags of the run, e.g. [perft_r,olmoe].
    """

    mode: Literal["", "online", "offline"] = ""
    project: str = "perft-jax"
    entity: str = ""
    name: str = ""
    group: str = ""
    tags: tuple[str, ...] = ()

    def validate_config(self, prefix: str = "train.wandb") -> "WandbConfig":
        if self.mode and not self.project:
            raise UserError(f"{prefix}.project: expected a W&B project name with {prefix}.mode={self.mode}, got ''")
        return self


def import_wandb(cfg: WandbConfig, prefix: str = "train.wandb"):
    """The `wandb` module, for a config that logs to W&B; a one-line error when it is not installed."""
    try:
        import wandb
    except ImportError:
        raise UserError(f"{prefix}.mode={cfg.mode}: the wandb package is not installed; "
                        "pip install 'perft-jax[wandb]' (or set train.wandb.mode= to log without W&B)") from None
    return wandb


class WandbRun:
    """One W&B run of a run directory: `log` a split's scalars at a step, `finish` at the end."""

    def __init__(self, cfg: WandbConfig, run_dir: str | pathlib.Path, config: dict[str, Any] | None = None):
        wandb = import_wandb(cfg)
        run_dir = pathlib.Path(run_dir)
        id_file = run_dir / RUN_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: lower-case letters and digits
            write_text_atomic(id_file, run_id + "\n")
        self._run = wandb.init(mode=cfg.mode, project=cfg.project, entity=cfg.entity or None,
                               name=cfg.name or run_dir.absolute().name, group=cfg.group or None,
                               tags=list(cfg.tags) or None, dir=str(run_dir), config=config, id=run_id,
                               resume="allow")
        self._splits: set[str] = set()

    def log(self, step: int, scalars: dict[str, float | int | None], split: str) -> None:
        """`<split>/<name>` values at `<split>/step` = `step` (None, i.e. NaN / inf, is left out)."""
        if split not in self._splits:
            self._run.define_metric(f"{split}/step")
            self._run.define_metric(f"{split}/*", step_metric=f"{split}/step")
            self._splits.add(split)
        values = {f"{split}/{k}": v for k, v in scalars.items() if v is not None}
        self._run.log({f"{split}/step": int(step), **values})

    def finish(self) -> None:
        self._run.finish()
