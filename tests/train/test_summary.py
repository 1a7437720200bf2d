"""The end-of-run summary of `run_training` (the lines a user reads when mode=train finishes)."""
from __future__ import annotations

from perft_jax.config import load_config
from perft_jax.train.summary import format_summary, no_best_reason


def _summary(**changes) -> dict:
    summary = {"start_step": 40, "step": 100, "total_steps": 100, "wall_time_s": 3725.4,
               "best": {"val_loss": 0.123456, "step": 80}, "best_adapters": "runs/x/best_adapters",
               "no_best_reason": None, "last_adapters": "runs/x/adapters", "metrics": "runs/x/metrics.jsonl",
               "views": {"tensorboard": "runs/x/tensorboard"}}
    return {**summary, **changes}


def test_a_resumed_run_with_validation():
    assert format_summary(_summary()).splitlines() == [
        "training done: step 40 -> 100 of 100 in 1h 02m 05s",
        "  best adapters: runs/x/best_adapters (validation loss 0.1235 at step 80)",
        "  last adapters: runs/x/adapters (step 100)",
        "  metrics: runs/x/metrics.jsonl; tensorboard: runs/x/tensorboard",
    ]


def test_a_run_without_validation_says_why_there_are_no_best_adapters():
    lines = format_summary(_summary(best={"val_loss": None, "step": None}, best_adapters=None, views={},
                                    no_best_reason="no validation rows: data.val_set_size=0",
                                    wall_time_s=75.2)).splitlines()
    assert lines[0].endswith(" in 1m 15s")
    assert lines[1] == "  best adapters: none (no validation rows: data.val_set_size=0)"
    assert lines[3] == "  metrics: runs/x/metrics.jsonl"


def test_the_reason_names_the_setting_that_turned_validation_off():
    cfg = load_config(None, ["model.hf_config=x.json"])
    assert no_best_reason(cfg, has_validation_rows=False) == "no validation rows: data.val_set_size=0"
    assert no_best_reason(cfg, has_validation_rows=True) == "no validation loss: train.eval_every_steps=0"
    off = load_config(None, ["model.hf_config=x.json", "train.keep_best=false"])
    assert no_best_reason(off, has_validation_rows=True) == "train.keep_best=false"
