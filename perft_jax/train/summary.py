"""The end-of-run summary of a training run: steps, wall time, where the adapters (last and best) and metrics went."""
from __future__ import annotations

from perft_jax.config import Config


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def format_summary(summary: dict) -> str:
    """The end-of-run lines of `run_training`'s summary: steps, wall time, where the adapters and metrics went."""
    best = summary["best"]
    lines = [f"training done: step {summary['start_step']} -> {summary['step']} of {summary['total_steps']} in "
             f"{_duration(summary['wall_time_s'])}"]
    if summary["best_adapters"]:
        lines.append(f"  best adapters: {summary['best_adapters']} (validation loss {best['val_loss']:.4f} at step "
                     f"{best['step']})")
    else:
        lines.append(f"  best adapters: none ({summary['no_best_reason']})")
    lines.append(f"  last adapters: {summary['last_adapters']} (step {summary['step']})")
    views = "".join(f"; {name}: {path}" for name, path in summary["views"].items())
    lines.append(f"  metrics: {summary['metrics']}{views}")
    return "\n".join(lines)


def no_best_reason(cfg: Config, has_validation_rows: bool) -> str:
    """Why a finished run kept no best adapters."""
    if not cfg.train.keep_best:
        return "train.keep_best=false"
    if not has_validation_rows:
        return "no validation rows: data.val_set_size=0"
    return "no validation loss: train.eval_every_steps=0"
