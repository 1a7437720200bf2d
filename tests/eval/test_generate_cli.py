"""`perft_jax.generate` (text in, text out) and `perft-generate` on the demo's tiny converted base with saved
PERFT-R adapters: the reply of the command equals the API's, and for greedy and beam search the token-level
`eval.generate.generate`'s decoded; prompt files to JSONL, the chat loop, `--help`, and bad input."""
from __future__ import annotations

import io
import json

import jax
import pytest
from flax import nnx

import perft_jax
from perft_jax.build import build_model
from perft_jax.config import ModelSection
from perft_jax.config_help import config_keys
from perft_jax.data.prompts import train_prompt
from perft_jax.data.tokenize import load_tokenizer
from perft_jax.demo import prepare_assets
from perft_jax.eval.generate import generate as generate_ids
from perft_jax.generate_cli import GenerateConfig, main
from perft_jax.generation import generate_conversations
from perft_jax.perft.adapters import AdapterParam
from perft_jax.perft.config import PerftConfig

PROMPTS = ["Is 47 greater than 12? Answer true or false.", "Is 3 greater than 80? Answer: true or false.",
           "Say something."]
NEW = 6  # one max_new_tokens everywhere: fewer compilations
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The demo's base (random weights, byte-level BPE tokenizer) + randomised PERFT-R adapters saved beside it, and
    a copy of the tokenizer with a chat template."""
    root = tmp_path_factory.mktemp("generate_cli")
    paths = prepare_assets(root)
    model = build_model(ModelSection(checkpoint=str(paths["base"])),
                        PerftConfig(variant="perft_r", adapter="parallel_adapter", bottleneck=8, num_adapters=4,
                                    top_k=2))
    adapters = nnx.state(model, AdapterParam)  # fresh adapters are (near) zero: randomise them so they matter
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(adapters))))
    nnx.update(model, jax.tree.map(lambda x: 0.5 * jax.random.normal(next(keys), x.shape, x.dtype), adapters))
    perft_jax.save_adapters(model, root / "adapters")
    from transformers import AutoTokenizer

    chat = AutoTokenizer.from_pretrained(str(paths["base"]))
    chat.chat_template = CHAT_TEMPLATE
    chat.save_pretrained(str(root / "chat_tokenizer"))
    return {"base": str(paths["base"]), "adapters": str(root / "adapters"), "chat": str(root / "chat_tokenizer"),
            "root": root}


@pytest.fixture(scope="module")
def model(assets):
    """What the command loads: the base with the saved adapters."""
    return perft_jax.load_adapters(build_model(ModelSection(checkpoint=assets["base"])), assets["adapters"])


def _run(assets, *args, stdin: str | None = None, monkeypatch=None, capsys=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main([f"model.checkpoint={assets['base']}", f"adapters={assets['adapters']}", f"max_new_tokens={NEW}",
                 *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_api_equals_token_level_generate(assets, model):
    """Greedy and beam search: the replies are the token-level generations of the training template up to
    `### Response:`, decoded; those prompt tokens begin the training rows' tokens."""
    tokenizer = load_tokenizer(assets["base"])
    ids = tokenizer.encode_batch([train_prompt(p, "").rstrip() for p in PROMPTS])
    rows = tokenizer.encode_batch([train_prompt(p, "the correct answer is true") for p in PROMPTS])
    assert all(row[:len(prompt)] == prompt for prompt, row in zip(ids, rows))
    want = {}
    for beams in (1, 2):
        # The API's prompt bucket (64): the same compilation serves both calls.
        new = generate_ids(model, ids, NEW, tokenizer.eos_id, tokenizer.pad_id, beams, pad_to_multiple_of=64)
        want[beams] = [tokenizer.decode(n, skip_special_tokens=True).strip() for n in new]
        got = perft_jax.generate(model, tokenizer, PROMPTS, max_new_tokens=NEW, num_beams=beams)
        assert got == want[beams] and any(got)
    assert want[1] != want[2]
    # A response prefix: the training template with it as the output's start, continued; the reply begins with it.
    prefix = "the correct answer is"
    new = generate_ids(model, tokenizer.encode_batch([train_prompt(p, prefix) for p in PROMPTS]), NEW,
                       tokenizer.eos_id, tokenizer.pad_id, pad_to_multiple_of=64)
    got = perft_jax.generate(model, tokenizer, PROMPTS, max_new_tokens=NEW, response_prefix=prefix + " ")
    assert got == [(prefix + tokenizer.decode(n, skip_special_tokens=True)).strip() for n in new]
    # str in, str out; the tokenizer loaded from a path.
    assert perft_jax.generate(model, assets["base"], PROMPTS[0], max_new_tokens=NEW) == want[1][0]
    base = build_model(ModelSection(checkpoint=assets["base"]))
    # The adapters change every reply, so a command that skipped them would not pass the tests below.
    assert all(a != b for a, b in zip(perft_jax.generate(base, tokenizer, PROMPTS, max_new_tokens=NEW), want[1]))


def test_single_prompt(assets, model, capsys):
    code, out, _ = _run(assets, "--prompt", PROMPTS[1], capsys=capsys)
    assert code == 0
    assert out == perft_jax.generate(model, assets["base"], PROMPTS[1], max_new_tokens=NEW) + "\n"
    code, out, _ = _run(assets, "--prompt", PROMPTS[1], "response_prefix=the correct answer is", capsys=capsys)
    assert code == 0 and out.startswith("the correct answer is")
    assert out == perft_jax.generate(model, assets["base"], PROMPTS[1], max_new_tokens=NEW,
                                     response_prefix="the correct answer is") + "\n"
    sample = ["do_sample=true", "temperature=0.8", "top_k=20", "top_p=0.9", "seed=5"]
    code, out, _ = _run(assets, "--prompt", PROMPTS[1], *sample, capsys=capsys)
    assert code == 0
    assert out == perft_jax.generate(model, assets["base"], PROMPTS[1], max_new_tokens=NEW, do_sample=True,
                                     temperature=0.8, top_k=20, top_p=0.9, seed=5) + "\n"


def test_prompts_file_to_jsonl(assets, model, capsys, tmp_path):
    want = perft_jax.generate(model, assets["base"], PROMPTS, max_new_tokens=NEW, batch_size=2)
    text_file = tmp_path / "prompts.txt"
    text_file.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n{PROMPTS[2]}\n")  # the empty line is skipped
    out_file = tmp_path / "replies.jsonl"
    code, _, err = _run(assets, f"prompts_file={text_file}", f"output={out_file}", "batch_size=2", capsys=capsys)
    assert code == 0 and "3 replies written" in err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert rows == [{"prompt": p, "reply": r} for p, r in zip(PROMPTS, want)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt", "replies.jsonl"]  # no temporary left
    json_file = tmp_path / "prompts.json"
    json_file.write_text(json.dumps(PROMPTS))
    code, out, _ = _run(assets, f"prompts_file={json_file}", "batch_size=2", capsys=capsys)
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == rows


def test_chat_loop_single_turn(assets, model, capsys, monkeypatch):
    """Without a chat template each line is a fresh instruction in the training template; /quit ends."""
    code, out, err = _run(assets, "interactive=true", stdin=f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n/quit\n{PROMPTS[2]}\n",
                          monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "alpaca template" in err
    assert out.splitlines() == perft_jax.generate(model, assets["base"], PROMPTS[:2], max_new_tokens=NEW)


def test_chat_loop_multi_turn(assets, model, capsys, monkeypatch):
    """With the tokenizer's chat template the history is carried; end of input ends; turn t samples with seed + t."""
    code, out, err = _run(assets, f"model.tokenizer={assets['chat']}", "interactive=true", "template=auto",
                          "do_sample=true", "seed=4", stdin=f"{PROMPTS[0]}\n{PROMPTS[1]}\n", monkeypatch=monkeypatch,
                          capsys=capsys)
    assert code == 0 and "chat template, multi-turn" in err
    first, second = out.splitlines()
    options = dict(template="chat", max_new_tokens=NEW, do_sample=True)
    turn = [{"role": "user", "content": PROMPTS[0]}]
    assert [first] == generate_conversations(model, assets["chat"], [turn], seed=4, **options)
    turn += [{"role": "assistant", "content": first}, {"role": "user", "content": PROMPTS[1]}]
    assert [second] == generate_conversations(model, assets["chat"], [turn], seed=5, **options)
    tokenizer = load_tokenizer(assets["chat"])
    prompt = tokenizer.encode(f"<|user|>{PROMPTS[0]}\n<|assistant|>{first}\n<|user|>{PROMPTS[1]}\n<|assistant|>")
    new = generate_ids(model, [prompt], NEW, tokenizer.eos_id, tokenizer.pad_id, do_sample=True, seed=5,
                       pad_to_multiple_of=64)
    assert second == tokenizer.decode(prompt + new[0], skip_special_tokens=True)[
        len(tokenizer.decode(prompt, skip_special_tokens=True)):].strip()


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    keys = [key for key, *_ in config_keys(GenerateConfig)]
    assert {"model.checkpoint", "adapters", "prompts_file", "interactive", "top_p", "seed", "template"} <= set(keys)
    for key in keys:
        assert f"\n  {key} " in out, key
    assert "the LLM-Adapters training template" in out


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "adapters=/no/such/adapters"], "adapters: no such directory '/no/such/adapters'"),
    ([], "give one of --prompt TEXT, prompts_file=FILE or interactive=true (got none)"),
    (["--prompt", "x", "interactive=true"], "got prompt and interactive"),
    (["prompts_file=/no/such/prompts.txt"], "prompts_file: cannot read '/no/such/prompts.txt'"),
    (["--prompt", "x", "output=out.jsonl"], "output: writes the replies to prompts_file's prompts"),
    (["--prompt", "x", "do_sample=true", "num_beams=4"], "num_beams: do_sample samples with one beam"),
    (["--prompt", "x", "top_p=1.5"], "top_p must be a number in [0, 1]"),
    (["--prompt", "x", "template=chat"], "has no chat template"),
    (["--prompt", "x", "temprature=0.5"], "temprature: unknown key"),
])
def test_bad_input_is_one_line_and_exit_2(assets, capsys, args, message):
    code, out, err = _run(assets, *args, capsys=capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_bad_prompt_files(assets, capsys, tmp_path):
    for name, text, message in [("p.json", "[1, 2]", "item 0 is not a string"), ("q.json", "{", "not valid JSON"),
                                ("r.txt", "\n\n", "no prompts")]:
        (tmp_path / name).write_text(text)
        code, _, err = _run(assets, f"prompts_file={tmp_path / name}", capsys=capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    (tmp_path / "s.txt").write_text("hello\n")
    code, _, err = _run(assets, f"prompts_file={tmp_path / 's.txt'}", f"output={tmp_path / 'no' / 'o.jsonl'}",
                        capsys=capsys)
    assert code == 2 and "output: no such directory" in err
    assert not (tmp_path / "no").exists()
