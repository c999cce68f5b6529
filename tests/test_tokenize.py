"""Tests for safedpo_ray.data.tokenize (exact ids with a hand-built word-level tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from safedpo_ray.data.tokenize import PKU_TEMPLATE, collate_pairs, format_prompt, tokenize_pairs

VOCAB = [
    "<|bos|>", "<|eos|>", "<|pad|>", "<unk>",           # 0..3
    "BEGINNING", "OF", "CONVERSATION", ":", "USER",     # 4..8
    "ASSISTANT", "how", "are", "you", "fine",           # 9..13
    "go", "away", "<|user|>", "<|assistant|>",          # 14..17
]
ID = {tok: i for i, tok in enumerate(VOCAB)}
BOS, EOS, PAD = 0, 1, 2
PLAIN_PROMPT = [BOS, 4, 5, 6, 7, 8, 7, 10, 11, 12, 9, 7]  # <|bos|> BEGINNING OF CONVERSATION: USER: how are you ASSISTANT:
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(*, bos: bool = True, post_bos: bool = False):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>"])
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", BOS)])
    kwargs = {"bos_token": "<|bos|>"} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>", unk_token="<unk>", **kwargs
    )


def batch(**overrides):
    base = {"prompt": ["how are you"], "chosen": ["fine"], "rejected": ["go away"]}
    base.update(overrides)
    return base


def test_format_prompt_plain_and_chat():
    tok = make_tokenizer()
    assert format_prompt(tok, "how are you") == PKU_TEMPLATE.format(prompt="how are you")
    assert format_prompt(tok, "x") == "BEGINNING OF CONVERSATION: USER: x ASSISTANT:"
    tok.chat_template = CHAT_TEMPLATE
    assert format_prompt(tok, "how are you") == "<|bos|><|user|> how are you <|assistant|>"


def test_tokenize_pairs_plain_template_exact_ids():
    tok = make_tokenizer()
    out = tokenize_pairs(batch(id=[7]), tok, max_length=64, max_prompt_length=32)
    assert out["prompt"] == ["how are you"] and out["chosen"] == ["fine"] and out["id"] == [7]
    assert out["prompt_ids"] == [PLAIN_PROMPT]
    assert out["chosen_ids"] == [[13, EOS]]
    assert out["rejected_ids"] == [[14, 15, EOS]]
    assert out["prompt_truncated"] == [False]
    assert out["chosen_truncated"] == [False] and out["rejected_truncated"] == [False]
    assert all(isinstance(i, int) for i in out["prompt_ids"][0] + out["chosen_ids"][0])


def test_tokenize_pairs_shared_prompt_and_numpy_columns():
    tok = make_tokenizer()
    cols = {
        "prompt": np.array(["how are you", "you"], dtype=object),
        "chosen": np.array(["fine", "go"], dtype=object),
        "rejected": np.array(["away", "fine fine"], dtype=object),
        "chosen_unsafe": np.array([False, True]),
    }
    out = tokenize_pairs(cols, tok, max_length=64, max_prompt_length=32)
    assert out["prompt_ids"] == [PLAIN_PROMPT, [BOS, 4, 5, 6, 7, 8, 7, 12, 9, 7]]
    assert out["chosen_ids"] == [[13, EOS], [14, EOS]]
    assert out["rejected_ids"] == [[15, EOS], [13, 13, EOS]]
    assert out["chosen_unsafe"] == [False, True]
    assert isinstance(out["prompt"], list)


def test_bos_not_duplicated_and_absent_without_bos_token():
    out = tokenize_pairs(batch(), make_tokenizer(post_bos=True), max_length=64, max_prompt_length=32)
    assert out["prompt_ids"] == [PLAIN_PROMPT]
    out = tokenize_pairs(batch(), make_tokenizer(bos=False), max_length=64, max_prompt_length=32)
    assert out["prompt_ids"] == [PLAIN_PROMPT[1:]]


def test_tokenize_pairs_chat_template_exact_ids():
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    out = tokenize_pairs(batch(), tok, max_length=64, max_prompt_length=32)
    # The template writes the BOS itself; no second one is added.
    assert out["prompt_ids"] == [[BOS, ID["<|user|>"], 10, 11, 12, ID["<|assistant|>"]]]
    assert out["chosen_ids"] == [[13, EOS]]
    assert out["rejected_ids"] == [[14, 15, EOS]]


def test_truncation_rules_and_flags():
    tok = make_tokenizer()
    out = tokenize_pairs(batch(), tok, max_length=7, max_prompt_length=5)
    assert out["prompt_ids"] == [[10, 11, 12, 9, 7]]  # last 5 prompt tokens kept
    assert out["prompt_truncated"] == [True]
    assert out["chosen_ids"] == [[13, EOS]]  # 5 + 2 == 7 fits
    assert out["chosen_truncated"] == [False]
    assert out["rejected_ids"] == [[14, 15]]  # cut on the right, EOS lost
    assert out["rejected_truncated"] == [True]

    out = tokenize_pairs(batch(), tok, max_length=14, max_prompt_length=12)
    assert out["prompt_ids"] == [PLAIN_PROMPT] and out["prompt_truncated"] == [False]
    assert out["chosen_ids"] == [[13, EOS]] and out["chosen_truncated"] == [False]
    assert out["rejected_ids"] == [[14, 15]] and out["rejected_truncated"] == [True]
    for p, c, r in zip(out["prompt_ids"], out["chosen_ids"], out["rejected_ids"]):
        assert len(p) + len(c) <= 14 and len(p) + len(r) <= 14


def test_bad_lengths_raise():
    tok = make_tokenizer()
    with pytest.raises(ValueError):
        tokenize_pairs(batch(), tok, max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError):
        tokenize_pairs(batch(), tok, max_length=8, max_prompt_length=16)


def test_tokenize_pairs_with_tiny_bpe(tmp_path):
    from safedpo_ray.models.loading import build_tiny_model, load_tokenizer

    texts = ["how are you today", "I am fine thanks", "go away please", "BEGINNING OF CONVERSATION"] * 20
    tok = load_tokenizer(build_tiny_model(tmp_path / "tiny", texts, vocab_size=300))
    out = tokenize_pairs(batch(), tok, max_length=128, max_prompt_length=64)
    p = out["prompt_ids"][0]
    assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1
    assert tok.decode(p[1:]) == PKU_TEMPLATE.format(prompt="how are you")
    assert out["chosen_ids"][0][-1] == tok.eos_token_id
    assert tok.decode(out["chosen_ids"][0][:-1]) == "fine"


EXPECTED_INPUT_IDS = [
    [5, 6, 7, 1, 99],
    [10, 11, 12, 13, 1],
    [5, 6, 8, 9, 1],
    [10, 14, 1, 99, 99],
]
EXPECTED_ATTENTION = [
    [1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1],
    [1, 1, 1, 0, 0],
]
EXPECTED_LOSS = [
    [0, 0, 1, 1, 0],
    [0, 1, 1, 1, 1],
    [0, 0, 1, 1, 1],
    [0, 1, 1, 0, 0],
]
ROWS = [
    {"prompt_ids": [5, 6], "chosen_ids": [7, 1], "rejected_ids": [8, 9, 1],
     "chosen_unsafe": False, "rejected_unsafe": True},
    {"prompt_ids": [10], "chosen_ids": [11, 12, 13, 1], "rejected_ids": [14, 1],
     "chosen_unsafe": True, "rejected_unsafe": True},
]


def check_collated(out):
    assert out["input_ids"].tolist() == EXPECTED_INPUT_IDS
    assert out["attention_mask"].tolist() == EXPECTED_ATTENTION
    assert out["loss_mask"].tolist() == EXPECTED_LOSS
    assert out["input_ids"].dtype == torch.long
    assert out["chosen_unsafe"].dtype == torch.float32
    assert out["chosen_unsafe"].tolist() == [0.0, 1.0]
    assert out["rejected_unsafe"].tolist() == [1.0, 1.0]


def test_collate_pairs_rows_exact():
    check_collated(collate_pairs(ROWS, pad_token_id=99))


def test_collate_pairs_columnar_numpy_exact():
    def ragged(key):  # what Ray Data hands over for variable-length list columns
        arr = np.empty(len(ROWS), dtype=object)
        for i, row in enumerate(ROWS):
            arr[i] = np.array(row[key], dtype=np.int64)
        return arr

    cols = {key: ragged(key) if key.endswith("_ids") else np.array([r[key] for r in ROWS]) for key in ROWS[0]}
    cols["prompt"] = np.array(["a", "b"], dtype=object)  # extra columns are ignored
    check_collated(collate_pairs(cols, pad_token_id=99))
    lists = {key: [r[key] for r in ROWS] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
    out = collate_pairs(lists, pad_token_id=99, pad_to_multiple_of=8)
    assert "chosen_unsafe" not in out
    assert out["input_ids"].shape == (4, 8)
    assert out["input_ids"][:, :5].tolist() == EXPECTED_INPUT_IDS
    assert out["input_ids"][:, 5:].eq(99).all() and out["loss_mask"][:, 5:].eq(0).all()


def test_collate_pairs_on_tokenized_batch():
    tok = make_tokenizer()
    out = collate_pairs(tokenize_pairs(batch(), tok, max_length=64, max_prompt_length=32), tok.pad_token_id)
    assert out["input_ids"].tolist() == [PLAIN_PROMPT + [13, EOS, PAD], PLAIN_PROMPT + [14, 15, EOS]]
    assert out["loss_mask"].tolist() == [[0] * 12 + [1, 1, 0], [0] * 12 + [1, 1, 1]]
