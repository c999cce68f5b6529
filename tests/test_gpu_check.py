"""benchmarks/gpu_check.py on CPU with a tiny model: the same training step (bf16, shared-prompt
layout, chunked output layer, DeepSpeed), layout log-probs and HF generation a GPU run does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = pytest.mark.timeout(300)


def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--preset", "tiny", "--cpu",
           "--pairs", "2", "--prompt-len", "24", "--response-len", "16", "--chunk", "16", "--warmup", "1",
           "--steps", "2", "--gen-batch", "2", "--new-tokens", "8", "--peak-tflops", "1.0", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    train, logps, gen = report["train"], report["logps"], report["generate"]
    assert report["device"] == "cpu" and report["bf16_peak_tflops"] == 1.0
    assert len(train["losses"]) == 3 and all(l == l for l in train["losses"])  # finite, one per step
    assert train["pair_tokens_per_s"] > 0 and 0 < train["mfu"] == pytest.approx(train["tflops_per_s"] / 1.0)
    assert logps["within"] and set(logps["gap_vs_padded"]) == {"shared", "packed"}
    assert gen["generated"] == 2 * 8 and gen["tokens_per_s"] > 0
    assert "MFU" in done.stdout and "generate 2 x 8" in done.stdout


def test_flops_count():
    """One pair, prompt 3 + chosen 2 + rejected 1 tokens, shared layout: 6 processed tokens (the
    prompt once), 3 scored. A model with body B parameters and an output layer of H: policy
    6·(B·6 + H·3) + reference 2·(B·6 + H·3) = 8·(6B + 3H)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import gpu_check

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50,
                                         tie_word_embeddings=False))
    head = embed = 50 * 16
    body = sum(p.numel() for p in model.parameters()) - head - embed
    pairs = {"prompt_ids": [[5, 6, 7]], "chosen_ids": [[8, 9]], "rejected_ids": [[10]]}
    assert gpu_check.flops_per_step(model, pairs) == 8 * (6 * body + 3 * head)
    assert gpu_check.bf16_peak_tflops(torch.device("cpu")) == (None, "cpu")
