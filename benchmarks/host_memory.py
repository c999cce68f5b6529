"""Peak host memory of one training worker's model load, as it was and as it is now.

    python benchmarks/host_memory.py                          # ~220M-parameter Llama, bf16 run
    python benchmarks/host_memory.py --layers 2 --hidden 256  # quicker
    python benchmarks/host_memory.py --checkpoint-dtype float32

Builds a random Llama from a config (no download), saves it as safetensors, then loads it in a
fresh process per mode, doing what a worker does before DeepSpeed shards anything (policy, plus
the live reference copy of a full fine-tune unless --no-reference; parameters cast to bf16 as
DeepSpeed and `prepare_reference` do):
  before: `load_model` in float32 (the old default), then cast;
  after:  `load_model` in the training precision (safedpo_ray/models/precision.py), the reference
          loaded again instead of deep-copied.
Prints each process's peak RSS (getrusage) and its rise over the RSS after imports, per
parameter, and what that rise would be for 8 workers of a 7B model (an extrapolation, linear in
the parameter count; not a measurement), then the anonymous and file-backed RSS once loaded
(file: the memory-mapped checkpoint's pages, which the workers of a node share in the page
cache, so the extrapolation counts them 8 times: an upper bound).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SEVEN_B = 6.74e9  # Llama-2-7B's parameters (alpaca-7b-reproduced is a Llama-7B)


def _status_kb(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(mode: str, model_dir: str, reference: bool) -> dict:
    """One worker's load in this process; returns peak and baseline RSS in bytes."""
    import safetensors.torch  # noqa: F401  (imported before the baseline: not the weights' memory)
    import torch
    from safedpo_ray.models.precision import weights_dtype
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    from safedpo_ray.models.loading import load_model, make_reference_copy

    AutoConfig.from_pretrained(model_dir)
    base = _status_kb() * 1024
    dtype = "float32" if mode == "before" else weights_dtype("bf16")
    model = load_model(model_dir, dtype=dtype)
    models = [model]
    if reference and mode == "before":  # the old worker: a deep copy of the policy
        models.append(make_reference_copy(model))
    elif reference:  # train/worker.py now: loaded again (memory-mapped when stored in bf16)
        models.append(load_model(model_dir, dtype=dtype).eval().requires_grad_(False))
    for m in models:  # DeepSpeed's bf16 engine (policy) and prepare_reference: parameters only
        for p in m.parameters():
            p.data = p.data.to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    # RssFile: pages of the memory-mapped safetensors file, shared by every worker on a node.
    return {"mode": mode, "peak": peak, "base": base, "params": params,
            "anon": _status_kb("RssAnon") * 1024, "file": _status_kb("RssFile") * 1024}


def build(out: Path, args) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, args.checkpoint_dtype))
    model.save_pretrained(out, safe_serialization=True)
    return out


def run(args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="safedpo-hostmem-") as tmp:
        model_dir = build(Path(tmp) / "model", args)
        rows = []
        for mode in ("before", "after"):
            cmd = [sys.executable, __file__, "--child", mode, str(model_dir)]
            if not args.reference:
                cmd.append("--no-reference")
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def report(rows: list[dict], args) -> None:
    gib = 1024**3
    params = rows[0]["params"]
    what = "policy + live reference" if args.reference else "policy only"
    print(f"\n{params / 1e6:.1f}M parameters, checkpoint in {args.checkpoint_dtype}, bf16 training, {what}")
    print(f"{'load':<8} {'peak RSS GiB':>13} {'after imports':>14} {'rise GiB':>9} {'bytes/param':>12} "
          f"{'7B x 8 workers GiB (extrapolated)':>34} {'then anon/file GiB':>19}")
    for r in rows:
        rise = r["peak"] - r["base"]
        per_param = rise / params
        print(f"{r['mode']:<8} {r['peak'] / gib:>13.2f} {r['base'] / gib:>14.2f} {rise / gib:>9.2f} "
              f"{per_param:>12.2f} {per_param * SEVEN_B * 8 / gib:>34.0f} "
              f"{r['anon'] / gib:>9.2f}/{r['file'] / gib:.2f}")
    before, after = (r["peak"] - r["base"] for r in rows)
    print(f"peak rise after / before: {after / before:.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "MODEL_DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="policy only (LoRA, SimPO or a cached reference hold no copy)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--checkpoint-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.reference)))
        return
    report(run(args), args)


if __name__ == "__main__":
    main()
