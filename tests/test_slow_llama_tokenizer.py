"""A Llama tokenizer in the slow format (`tokenizer.model` + `tokenizer_config.json`, no
`tokenizer.json`), as safe-rlhf saves `PKU-Alignment/alpaca-7b-reproduced` and the beaver-7b
reward/cost models: transformers 5 converts it only with `sentencepiece` (a core dependency).

The SentencePiece model is trained here on a few hundred sentences (no download)."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

WORDS = ("the a safe harmful answer question model reply help refuse explain kindly never always "
         "people data train").split()


@pytest.fixture(scope="module")
def slow_llama_dir(tmp_path_factory) -> Path:
    import sentencepiece as spm

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(8)) + "." for _ in range(300)]
    model = io.BytesIO()
    # Llama's layout: <unk> 0, <s> 1, </s> 2, no pad piece, byte fallback.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=400,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   byte_fallback=True, minloglevel=2)
    out = tmp_path_factory.mktemp("slow-llama")
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 512, "legacy": False}))
    return out


def test_slow_llama_tokenizer_loads(slow_llama_dir):
    from safedpo_ray.models.loading import load_tokenizer

    assert sorted(p.name for p in slow_llama_dir.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    tokenizer = load_tokenizer(str(slow_llama_dir))
    assert len(tokenizer) == 400
    ids = tokenizer("the safe answer, kindly explained")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == 2
    assert tokenizer.pad_token == "</s>"  # no pad piece: load_tokenizer falls back to EOS
    assert tokenizer.padding_side == "right"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the safe answer, kindly explained"


_LOAD_WITHOUT_SENTENCEPIECE = """
import sys
sys.modules["sentencepiece"] = None  # as on an install without it
from safedpo_ray.models.loading import load_tokenizer
try:
    load_tokenizer(sys.argv[1])
except Exception as e:
    print("FAILED", type(e).__name__, e)
else:
    print("LOADED")
"""


def test_without_sentencepiece_the_same_directory_fails(slow_llama_dir):
    """The failure a fresh install without sentencepiece met: transformers falls back to reading
    `tokenizer.model` as a tiktoken file. Guards the reason the dependency exists."""
    done = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_SENTENCEPIECE, str(slow_llama_dir)],
                          capture_output=True, text=True, timeout=120)
    assert "FAILED" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "tiktoken" in done.stdout
