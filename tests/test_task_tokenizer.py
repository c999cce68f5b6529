"""Data tasks tokenize with the Rust backend alone when it is exactly the transformers tokenizer
(safedpo_ray/data/task_tokenizer.py): the same ids, and no transformers or torch import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from safedpo_ray.data.task_tokenizer import BackendTokenizer, backend_spec
from safedpo_ray.data.tokenize import tokenize_pairs
from safedpo_ray.models.loading import EOS_TOKEN, _train_tiny_tokenizer

TEXTS = ["How do I bake bread?", "Knead the dough.  Twice!", "é ü 日本 ✓ \n\t x", f"an {EOS_TOKEN} inside",
         " leading space", "trailing space ", "I cannot help with that."]
OTHER = ["words the tokenizer never saw: zyxw qqq", "日本語のテキスト", f"{EOS_TOKEN}{EOS_TOKEN}", "", "  "]


@pytest.fixture(scope="module")
def tok():
    return _train_tiny_tokenizer(TEXTS * 4, 400, 512)


def hf_ids(tok, texts):
    return [list(map(int, ids)) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def test_the_backend_alone_gives_the_transformers_ids(tok):
    spec = backend_spec(tok, TEXTS)
    assert spec is not None and spec["eos_token_id"] == tok.eos_token_id and spec["bos_token_id"] == tok.bos_token_id
    fast = BackendTokenizer(json.loads(json.dumps(spec)))  # as a task receives it
    assert fast.encode_texts(TEXTS + OTHER) == hf_ids(tok, TEXTS + OTHER)
    batch = {"prompt": TEXTS[:4] + OTHER[:1], "chosen": TEXTS[2:7], "rejected": OTHER[:3] + TEXTS[:2]}
    for max_length, max_prompt in ((512, 256), (12, 5)):  # with truncation too
        assert tokenize_pairs(batch, fast, max_length=max_length, max_prompt_length=max_prompt) == \
            tokenize_pairs(batch, tok, max_length=max_length, max_prompt_length=max_prompt)


def test_split_special_tokens_travels_with_the_spec(tok):
    tok.split_special_tokens = True
    try:
        spec = backend_spec(tok, TEXTS)
        assert spec is not None and spec["split_special_tokens"] is True
        text = [f"a {EOS_TOKEN} b"]
        assert BackendTokenizer(spec).encode_texts(text) == hf_ids(tok, text)
        assert tok.eos_token_id not in BackendTokenizer(spec).encode_texts(text)[0]
    finally:
        tok.split_special_tokens = False


def test_no_spec_where_the_backend_alone_could_differ(tok, monkeypatch):
    chat = _train_tiny_tokenizer(TEXTS, 400, 512)
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert backend_spec(chat, TEXTS) is None  # chat templates need transformers' renderer

    class OwnEncoding(type(tok)):  # a tokenizer class with its own encoding path
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    odd = OwnEncoding(tokenizer_object=tok.backend_tokenizer, eos_token=tok.eos_token, bos_token=tok.bos_token)
    assert backend_spec(odd, TEXTS) is None
    # ids that differ on any checked text (here: forced) leave the tasks on transformers' path
    monkeypatch.setattr(BackendTokenizer, "encode_texts", lambda self, texts: [[0] for _ in texts])
    assert backend_spec(tok, TEXTS) is None


TASK = r"""
import json, sys
from safedpo_ray.data.files import resolve_files, plan_chunks
from safedpo_ray.data.stream import process_chunk
p = json.loads(open(sys.argv[1]).read())
rows = [r for t in process_chunk(plan_chunks(resolve_files(sys.argv[2]))[0], p) for r in t.to_pylist()]
print(json.dumps({"ids": [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in rows],
                  "modules": sorted(m for m in ("transformers", "torch") if m in sys.modules)}))
"""


def test_a_task_with_a_spec_imports_neither_transformers_nor_torch(tok, tmp_path):
    rows = [{"prompt": t, "response_0": TEXTS[(i + 1) % len(TEXTS)], "response_1": OTHER[i % 2],
             "is_response_0_safe": True, "is_response_1_safe": i % 2 == 0, "better_response_id": i % 2,
             "safer_response_id": 0} for i, t in enumerate(TEXTS)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok.save_pretrained(tmp_path / "tok")
    p = {"schema": "auto", "strict": False, "eval_fraction": 0.0, "mode": "safedpo", "tokenizer": str(tmp_path / "tok"),
         "trust_remote_code": False, "max_length": 64, "max_prompt_length": 24, "max_row_bytes": 2**20,
         "drop_duplicates": False}
    results = {}
    for name, spec in (("backend", backend_spec(tok, TEXTS)), ("transformers", None)):
        (tmp_path / "p.json").write_text(json.dumps({**p, "tokenizer_spec": spec}))
        done = subprocess.run([sys.executable, "-c", TASK, str(tmp_path / "p.json"), str(data)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["backend"]["modules"] == [] and results["transformers"]["modules"] == ["torch", "transformers"]
    assert results["backend"]["ids"] == results["transformers"]["ids"] and len(results["backend"]["ids"]) == len(rows)
