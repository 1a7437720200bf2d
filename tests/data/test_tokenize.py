"""Specs for tokenizer loading and the LLM-Adapters training tokenisation (data README §2; ENGINEERING.md §8)."""
from __future__ import annotations

import json
import shutil

import pytest
from testing_utils import CharTokenizer

from perft_jax.data.config import DataConfig
from perft_jax.data.prompts import record_prompt_split
from perft_jax.data.tokenize import load_tokenizer, tokenize_batch, tokenize_example
from perft_jax.errors import UserError
from perft_jax.labels import IGNORE_INDEX

OLMOE_EOS, OLMOE_PAD = 50279, 1  # ENGINEERING.md §8
MIXTRAL_BOS, MIXTRAL_EOS = 1, 2


def ids(text):
    return [ord(c) for c in text]


# --- README §2 EOS rule and label masking, on visible counts -----------------------------------------


def test_short_text_gets_eos_and_labels_copy_ids():
    ex = tokenize_example(CharTokenizer(), "ab", "abc", DataConfig(cutoff_len=10))
    assert ex.input_ids == ids("abc") + [3]
    assert ex.labels == ex.input_ids


def test_eos_added_when_one_short_of_cutoff():
    ex = tokenize_example(CharTokenizer(), "", "abcd", DataConfig(cutoff_len=5))
    assert ex.input_ids == ids("abcd") + [3]


@pytest.mark.parametrize("text", ["abcde", "abcdefghijkl"])  # exactly cutoff tokens / truncated to cutoff
def test_no_eos_at_or_past_cutoff(text):
    ex = tokenize_example(CharTokenizer(), "", text, DataConfig(cutoff_len=5))
    assert ex.input_ids == ids(text[:5])


def test_text_already_ending_in_eos_gets_no_second_eos():
    ex = tokenize_example(CharTokenizer(), "", "ab\x03", DataConfig(cutoff_len=10))
    assert ex.input_ids == [97, 98, 3]


def test_add_eos_false_appends_nothing():
    ex = tokenize_example(CharTokenizer(), "", "abc", DataConfig(cutoff_len=10, add_eos=False))
    assert ex.input_ids == ids("abc")


def test_train_on_inputs_false_masks_prompt_token_count():
    ex = tokenize_example(CharTokenizer(), "ab", "abcd", DataConfig(cutoff_len=10, train_on_inputs=False))
    assert ex.input_ids == ids("abcd") + [3]
    assert ex.labels == [IGNORE_INDEX, IGNORE_INDEX, 99, 100, 3]


def test_train_on_inputs_false_prompt_reaching_cutoff_masks_everything_same_length():
    cfg = DataConfig(cutoff_len=4, train_on_inputs=False)
    ex = tokenize_example(CharTokenizer(), "abcdef", "abcdefgh", cfg)
    assert ex.input_ids == ids("abcd")
    assert ex.labels == [IGNORE_INDEX] * 4


def test_text_with_no_tokens_is_refused_or_left_empty():
    with pytest.raises(UserError, match="no tokens"):
        tokenize_example(CharTokenizer(), "", "", DataConfig())
    assert tokenize_batch(CharTokenizer(), [""], [""], DataConfig(), allow_empty=True)[0].input_ids == []


def test_add_eos_needs_an_eos_id():
    tok = CharTokenizer()
    tok.eos_id = None
    with pytest.raises(UserError, match="data.add_eos"):
        tokenize_example(tok, "", "abc", DataConfig())


# --- real OLMoE tokenizer on real records ---------------------------------------------------------------


@pytest.fixture(scope="module")
def olmoe(shared_dir):
    return load_tokenizer(shared_dir / "tokenizers" / "olmoe_tokenizer.json")


@pytest.fixture(scope="module")
def records(shared_dir):
    root = shared_dir / "data" / "llm_adapters"
    math = json.loads((root / "ft-training_set" / "math_data.json").read_text())
    arc = json.loads((root / "ARC-Easy" / "train.json").read_text())
    return {"math": math, "arc": arc}


def test_olmoe_special_ids(olmoe):
    assert (olmoe.eos_id, olmoe.pad_id, olmoe.bos_id) == (OLMOE_EOS, OLMOE_PAD, None)


@pytest.mark.parametrize("which", ["math", "arc"])
def test_olmoe_train_on_inputs_true_real_record(olmoe, records, which):
    split = record_prompt_split(records[which][0])
    ex = tokenize_example(olmoe, split.prompt, split.full, DataConfig())
    assert ex.input_ids == olmoe.encode(split.full) + [OLMOE_EOS]  # OLMoE adds no BOS
    assert len(ex.input_ids) < 256
    assert ex.labels == ex.input_ids


@pytest.mark.parametrize("which", ["math", "arc"])
def test_olmoe_train_on_inputs_false_real_record(olmoe, records, which):
    record = records[which][0]
    split = record_prompt_split(record)
    ex = tokenize_example(olmoe, split.prompt, split.full, DataConfig(train_on_inputs=False))
    n = len(olmoe.encode(split.prompt))
    assert 0 < n < len(ex.input_ids)
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert ex.labels[n:] == ex.input_ids[n:]
    # OLMoE's tokenizer has a 16-space token, so the prefix count is the true boundary: what is learned is
    # exactly the output and EOS.
    assert olmoe.decode(ex.input_ids[n:]) == record["output"] + "<|endoftext|>"


def test_olmoe_long_math_record_is_truncated_without_eos(olmoe, records):
    cfg = DataConfig()
    long_row = next(r for r in records["math"] if len(olmoe.encode(record_prompt_split(r).full)) > 300)
    split = record_prompt_split(long_row)
    ex = tokenize_example(olmoe, split.prompt, split.full, cfg)
    assert len(ex.input_ids) == cfg.cutoff_len == len(ex.labels)
    assert ex.input_ids == olmoe.encode(split.full)[:256]
    assert ex.input_ids[-1] != OLMOE_EOS


def test_olmoe_folder_via_autotokenizer_matches_bare_file(olmoe, records, shared_dir, tmp_path):
    shutil.copy(shared_dir / "tokenizers" / "olmoe_tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}))
    folder = load_tokenizer(tmp_path)
    assert (folder.eos_id, folder.pad_id) == (OLMOE_EOS, OLMOE_PAD)
    texts = [record_prompt_split(r).full for r in records["arc"][:5] + records["math"][:5]]
    assert folder.encode_batch(texts, max_length=256) == olmoe.encode_batch(texts, max_length=256)
    assert folder.encode(texts[0]) == olmoe.encode(texts[0])


# --- Mixtral SentencePiece: exact ids with BOS (ENGINEERING.md §8) ----------------------------------------


@pytest.fixture(scope="module")
def mixtral_model(shared_dir):
    return shared_dir / "tokenizers" / "mixtral_tokenizer.model"


@pytest.fixture(scope="module")
def sp(mixtral_model):
    sentencepiece = pytest.importorskip("sentencepiece")
    return sentencepiece.SentencePieceProcessor(model_file=str(mixtral_model))


# HF's converted tokenizer differs from SentencePiece on these (ENGINEERING.md §8).
PITFALL_TEXTS = ["x  y", " a", "literal <s> and </s>", "                ### Response:\n                x"]


def test_mixtral_ids_are_sentencepiece_ids_with_bos(mixtral_model, sp, records):
    tok = load_tokenizer(mixtral_model)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (MIXTRAL_BOS, MIXTRAL_EOS, None)
    texts = PITFALL_TEXTS + [record_prompt_split(records["arc"][0]).full]
    for text in texts:
        assert tok.encode(text) == [MIXTRAL_BOS] + sp.encode(text)
    assert tok.encode_batch(texts) == [[MIXTRAL_BOS] + sp.encode(t) for t in texts]


def test_mixtral_truncation_counts_bos(mixtral_model, sp):
    tok = load_tokenizer(mixtral_model)
    text = "one two three four five six seven"
    assert tok.encode(text, max_length=4) == [MIXTRAL_BOS] + sp.encode(text)[:3]


def test_mixtral_folder_uses_sentencepiece_and_its_bos_flag(mixtral_model, sp, tmp_path):
    shutil.copy(mixtral_model, tmp_path / "tokenizer.model")
    assert load_tokenizer(tmp_path).encode(" a") == [MIXTRAL_BOS] + sp.encode(" a")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert load_tokenizer(tmp_path).encode(" a") == sp.encode(" a")


def test_mixtral_train_example_real_arc_row(mixtral_model, sp, records):
    tok = load_tokenizer(mixtral_model)
    split = record_prompt_split(records["arc"][0])
    ex = tokenize_example(tok, split.prompt, split.full, DataConfig(train_on_inputs=False))
    assert ex.input_ids == [MIXTRAL_BOS] + sp.encode(split.full) + [MIXTRAL_EOS]
    n = 1 + len(sp.encode(split.prompt))  # the prefix's count, BOS included, kept as upstream
    assert ex.labels == [IGNORE_INDEX] * n + ex.input_ids[n:]


# --- loading errors -------------------------------------------------------------------------------------


def test_missing_tokenizer_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")


def test_unknown_tokenizer_file_kind_is_a_user_error(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(UserError, match="vocab.txt"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_bare_tokenizer_json_without_eos_needs_eos_token(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "t.json"))
    with pytest.raises(UserError, match="eos_token"):
        load_tokenizer(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json", eos_token="[UNK]").eos_id == 1
