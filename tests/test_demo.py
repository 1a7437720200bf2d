"""The demo as a new user runs it (`perft-train` without --config), shortened to 6 steps: the end-of-run summary,
the chance level, validation and accuracy in TensorBoard and W&B (offline), and `mode=eval` honoured."""
from __future__ import annotations

import contextlib
import io
import json
import re
import sys

import pytest

from perft_jax import cli, demo
from perft_jax.errors import UserError
from perft_jax.train.loop import run_training
from tests.log_readers import offline_wandb, tensorboard_scalars, wandb_history

STEPS, EXAMPLES = 6, 32
SHORT = ["train.max_steps=6", "train.eval_every_steps=3", "data.val_set_size=16", f"eval.max_examples={EXAMPLES}",
         f"eval.batch_size={EXAMPLES}", "train.progress_bar=false"]


def _run(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, stdout) of the demo trained for 6 steps, logging to TensorBoard and W&B offline."""
    root = tmp_path_factory.mktemp("demo")
    with offline_wandb(root / "wandb_dir"):
        code, out, err = _run(cli.train_main, [f"train.output_dir={root / 'run'}", *SHORT, "train.wandb.mode=offline",
                                               "train.wandb.project=perft-jax-tests"])
    assert code == 0, err[-3000:]
    return root / "run", out


def _metrics(run_dir, split: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if row["split"] == split}


def test_training_ends_with_a_summary_of_where_everything_went(trained):
    run_dir, out = trained
    best = min(_metrics(run_dir, "val").values(), key=lambda row: row["lm"])
    assert re.search(rf"^training done: step 0 -> {STEPS} of {STEPS} in [0-9.]+ s$", out, re.M), out
    assert f"  best adapters: {run_dir}/best_adapters (validation loss {best['lm']:.4f} at step {best['step']})" in out
    assert f"  last adapters: {run_dir}/adapters (step {STEPS})" in out
    assert (f"  metrics: {run_dir}/metrics.jsonl; tensorboard: {run_dir}/tensorboard; W&B: offline, project "
            f"perft-jax-tests ({run_dir}/wandb)") in out


def test_accuracies_are_shown_beside_the_chance_level(trained):
    _, out = trained
    assert re.search(r"^  chance \(a random true/false\) +50\.0%$", out, re.M), out
    for name in ("before fine-tuning", "after fine-tuning"):
        assert re.search(rf"^  {name} +[0-9.]+%   \d+ of {EXAMPLES}$", out, re.M), out
    assert "counts as wrong" in out


def test_the_resolved_config_records_a_training_run(trained):
    run_dir, _ = trained
    config = json.loads((run_dir / "config.json").read_text())
    assert config["mode"] == "train"
    for name in ("adapters", "best_adapters"):  # the adapters name the base they were trained on
        meta = json.loads((run_dir / name / "adapter_config.json").read_text())["perft_jax"]
        assert meta["base_model"]["name_or_path"] == config["model"]["checkpoint"]


def test_validation_loss_and_accuracy_reach_tensorboard(trained):
    run_dir, _ = trained
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    val = _metrics(run_dir, "val")
    assert scalars["val/lm"] == pytest.approx({step: row["lm"] for step, row in val.items()}, rel=1e-6)
    evals = _metrics(run_dir, "eval")  # before (step 0) and after fine-tuning (the best adapters' step)
    best_step = min(val.values(), key=lambda row: row["lm"])["step"]
    assert sorted(evals) == [0, best_step]
    after = json.loads((run_dir / "eval_after.json").read_text())
    assert evals[best_step]["accuracy/synthetic_compare"] == after["accuracy"]["synthetic_compare"]
    for tag, key in (("eval/accuracy/synthetic_compare", "accuracy/synthetic_compare"),
                     ("eval/macro_average", "macro_average")):
        assert scalars[tag] == pytest.approx({step: row[key] for step, row in evals.items()}, rel=1e-6)


def test_wandb_offline_files_hold_the_runs_metrics(trained):
    run_dir, _ = trained
    history = wandb_history(run_dir / "wandb")
    for split, key in (("train", "lm"), ("val", "lm"), ("eval", "macro_average")):
        logged = {row[f"{split}/step"]: row[f"{split}/{key}"] for row in history if f"{split}/step" in row}
        assert logged == pytest.approx({step: row[key] for step, row in _metrics(run_dir, split).items()}, rel=1e-12)


def test_eval_mode_evaluates_the_adapters_and_records_what_ran(trained):
    run_dir, _ = trained
    config_json = (run_dir / "config.json").read_text()
    code, out, err = _run(cli.train_main, ["mode=eval", f"train.output_dir={run_dir}",
                                           f"eval.adapters={run_dir}/best_adapters", *SHORT])
    assert code == 0, err[-3000:]
    assert "chance level: 50.0% (a random true/false answer)" in out
    assert (run_dir / "config.json").read_text() == config_json  # the training record is left as it was
    ran = json.loads((run_dir / "eval_config.json").read_text())
    assert (ran["mode"], ran["eval"]["adapters"]) == ("eval", f"{run_dir}/best_adapters")
    result = json.loads((run_dir / "eval.json").read_text())
    after = json.loads((run_dir / "eval_after.json").read_text())
    assert result["accuracy"] == after["accuracy"]  # the same adapters on the same rows, greedy
    best_step = json.loads((run_dir / "best_adapters" / "adapter_config.json").read_text())["perft_jax"]["step"]
    assert _metrics(run_dir, "eval")[best_step]["macro_average"] == result["macro_average"]


def test_eval_of_missing_adapters_is_one_line_and_exit_2(trained, tmp_path):
    run_dir, _ = trained
    code, _, err = _run(cli.eval_main, [f"train.output_dir={run_dir}", f"eval.adapters={tmp_path / 'none'}"])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "none" in err, err


def test_training_without_the_wandb_package_stops_before_creating_anything(trained, tmp_path, monkeypatch):
    run_dir, _ = trained
    root = run_dir.parent
    cfg = demo.demo_config(root, demo.prepare_assets(root), [f"train.output_dir={tmp_path / 'run'}",
                                                             "train.wandb.mode=online"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'perft-jax\[wandb\]'"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()
