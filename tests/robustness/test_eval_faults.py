"""Bad benchmark files, adapters and tokenizers for `perft-eval` (issue 15): one line naming the file (and row),
exit code 2, every benchmark file read before the first generation, and no output directory or eval.json left."""
from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from perft_jax.cli import eval_main
from tests.robustness.battery import Tree, call_main, fails_cleanly

TASK = "synthetic_compare"  # the demo's benchmark (perft_jax/demo.py)
ROW = {"instruction": "Is 3 greater than 2? Answer true or false.", "input": "", "output": "", "answer": "true"}

# test.json contents -> what the line must say besides the file's path
BAD_TEST_FILES = {
    "garbled": (b'[{"instruction": ', "cannot read"),
    "object": (json.dumps({"rows": [ROW]}).encode(), "expected a JSON array of records, got dict"),
    "empty array": (b"[]", "no rows to evaluate"),
    "no answer": (json.dumps([ROW, {"instruction": "x"}]).encode(), "row 1 needs a string 'instruction' and an"),
    "number instruction": (json.dumps([{**ROW, "instruction": 7}]).encode(), "row 0 needs a string 'instruction'"),
    "list input": (json.dumps([ROW, {**ROW, "input": ["a"]}]).encode(), "row 1: 'input' must be a string"),
    "latin-1": ('[{"instruction": "café", "answer": "true"}]'.encode("latin-1"), "utf-8"),
}


def _eval_fails(run_config, work, capfd, overrides, *culprits):
    config = run_config()
    before = Tree(work)
    return fails_cleanly(call_main(eval_main, ["--config", config, *overrides], capfd), *culprits, untouched=before)


def _data_dir(work, tiny_base, files: dict[str, bytes]):
    """An evaluation folder: the demo's own benchmark file, plus `files` ({benchmark: test.json bytes})."""
    data = shutil.copytree(tiny_base["eval_dir"], work / "eval_data")
    for name, contents in files.items():
        (data / name).mkdir(exist_ok=True)
        (data / name / "test.json").write_bytes(contents)
    return data


@pytest.mark.parametrize("case", BAD_TEST_FILES)
def test_bad_benchmark_file(run_config, work, capfd, tiny_base, case):
    contents, says = BAD_TEST_FILES[case]
    data = _data_dir(work, tiny_base, {TASK: contents})
    _eval_fails(run_config, work, capfd, [f"eval.data_dir={data}"], data / TASK / "test.json", says)


def test_missing_benchmark_file(run_config, work, capfd, tiny_base):
    _eval_fails(run_config, work, capfd, [f"eval.data_dir={work / 'nothing'}"],
                work / "nothing" / TASK / "test.json", "cannot read")


def test_a_bad_second_benchmark_fails_before_the_first_is_generated(run_config, work, capfd, tiny_base):
    data = _data_dir(work, tiny_base, {"boolq": b"{"})
    line = _eval_fails(run_config, work, capfd, [f"eval.data_dir={data}", f"eval.benchmarks=[{TASK},boolq]"],
                       data / "boolq" / "test.json")
    assert "boolq" in line


def test_unknown_benchmark(run_config, work, capfd):
    _eval_fails(run_config, work, capfd, ["eval.benchmarks=[boolqq]"], "unknown benchmark 'boolqq'")


def test_no_benchmarks(run_config, work, capfd):
    _eval_fails(run_config, work, capfd, ["eval.benchmarks=[]"], "eval.benchmarks")


def test_adapters_that_are_a_base_checkpoint(run_config, work, capfd, tiny_base):
    _eval_fails(run_config, work, capfd, [f"eval.adapters={tiny_base['base']}"],
                tiny_base["base"] / "adapter_config.json", "missing adapter config")


def test_adapters_that_do_not_exist(run_config, work, capfd):
    _eval_fails(run_config, work, capfd, [f"eval.adapters={work / 'no_adapters'}"], work / "no_adapters")


def test_adapters_with_a_garbled_config(run_config, work, capfd):
    (work / "adapters").mkdir()
    (work / "adapters" / "adapter_config.json").write_text('{"perft_jax": ')
    _eval_fails(run_config, work, capfd, [f"eval.adapters={work / 'adapters'}"],
                work / "adapters" / "adapter_config.json", "unreadable adapter config")


def test_adapters_of_another_shape(run_config, work, capfd, tiny_base):
    """Adapters saved for another PERFT config (bottleneck 8, not the file's 32) are refused naming the tensor."""
    from perft_jax import load_model, save_adapters
    from perft_jax.perft.config import PerftConfig

    model = load_model(tiny_base["base"], perft=PerftConfig(variant="perft_r", bottleneck=8, num_adapters=4, top_k=2))
    out = save_adapters(model, work / "adapters")
    config = json.loads((out / "adapter_config.json").read_text())
    config["perft_jax"]["perft"]["bottleneck"] = 32
    (out / "adapter_config.json").write_text(json.dumps(config))
    _eval_fails(run_config, work, capfd, [f"eval.adapters={out}"], out / "adapter_model.safetensors", "shape")


def test_tokenizer_with_more_ids_than_the_vocabulary(run_config, work, capfd, tiny_base):
    tok = AutoTokenizer.from_pretrained(str(tiny_base["base"]))
    tok.add_tokens([f"<extra_{i}>" for i in range(40)])
    tok.save_pretrained(str(work / "tokenizer"))
    _eval_fails(run_config, work, capfd, [f"model.tokenizer={work / 'tokenizer'}"], work / "tokenizer",
                tiny_base["base"], "vocab_size 384")
