"""GPU check: the training step, the layouts' log-probs and HF generation on one CUDA GPU, in minutes.

    python benchmarks/gpu_check.py                          # a 1.1B Llama (random weights), on cuda
    python benchmarks/gpu_check.py --preset 7b --only generate --gen-batch 64 --new-tokens 1024
    python benchmarks/gpu_check.py --model /path/to/hf-model --json out.json
    python benchmarks/gpu_check.py --preset tiny --cpu      # the same code on CPU (what the test runs)

No download: the model is a random Llama built from a config (or a local directory), the pairs
are random token ids. What it runs, each a section of the printed report (`--only` picks):
  train:    SafeDPO steps as a worker runs them: DeepSpeedStrategy (bf16, ZeRO --zero-stage,
            torch's fused AdamW on GPUs), the shared-prompt layout, the chunked output layer,
            a frozen bf16 reference; tokens/s and MFU against the GPU's dense bf16 peak.
  logps:    the shared and packed layouts' per-sequence log-probs against the padded layout's
            (relative gap, and whether it is within the bf16 tolerance the workers accept).
  generate: `model.generate` (HF, greedy, KV cache) of --gen-batch prompts x --new-tokens tokens;
            tokens/s and peak GPU memory.
MFU counts 6 FLOPs per parameter and token for the policy's forward+backward and 2 for the
reference's forward, the output layer only on scored (response) tokens as the chunked layer
does; attention scores are left out (a few % at 512 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched by
# substring of torch.cuda.get_device_name(); --peak-tflops overrides.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
)

PRESETS = {  # Llama shapes; 7b is Llama-2-7B's (alpaca-7b-reproduced)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512),
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000),
}


def bf16_peak_tflops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None), name


def build_model(args, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.model:
        from safedpo_ray.models.loading import load_model

        return load_model(args.model, dtype="bfloat16")
    config = LlamaConfig(**PRESETS[args.preset], num_key_value_heads=PRESETS[args.preset]["num_attention_heads"],
                         max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no host copy of a large model
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.cpu() if device.type == "cpu" else model


def random_pairs(n: int, prompt_len: int, response_len: int, vocab: int, seed: int) -> dict[str, list]:
    g = torch.Generator().manual_seed(seed)

    def ids(length: int) -> list[list[int]]:  # lengths vary a little, as real pairs do
        return [torch.randint(3, vocab, (max(1, length - int(torch.randint(0, max(1, length // 4), (1,), generator=g))),),
                              generator=g).tolist() for _ in range(n)]

    return {"prompt_ids": ids(prompt_len), "chosen_ids": ids(response_len), "rejected_ids": ids(response_len),
            "chosen_unsafe": [i % 2 for i in range(n)], "rejected_unsafe": [(i // 2) % 2 for i in range(n)]}


def flops_per_step(model, pairs: dict[str, list]) -> float:
    """6·N per processed token (policy) + 2·N (reference); the output layer on response tokens only."""
    def numel(p) -> int:  # ZeRO-3 partitions leave p empty: ds_numel is the whole size
        return int(getattr(p, "ds_numel", 0) or p.numel())

    head = numel(model.get_output_embeddings().weight)
    embed = numel(model.get_input_embeddings().weight)
    body = sum(numel(p) for p in model.parameters()) - head - embed
    processed = sum(len(p) + len(c) + len(r) for p, c, r in
                    zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"]))  # shared: prompt once
    scored = sum(len(c) + len(r) for c, r in zip(pairs["chosen_ids"], pairs["rejected_ids"]))
    return 8.0 * (body * processed + head * scored)


def init_single_process(backend: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)
    dist.init_process_group(backend, rank=0, world_size=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_train(model, args, device, report: dict[str, Any]) -> Any:
    from safedpo_ray.config.training import load_config
    from safedpo_ray.core import logp_head
    from safedpo_ray.core.algorithm import concatenated_logps, safedpo_forward
    from safedpo_ray.data.tokenize import collate_pairs
    from safedpo_ray.models.loading import make_reference_copy
    from safedpo_ray.train.strategy import DeepSpeedStrategy

    on_gpu = device.type == "cuda"
    cfg = load_config(None, [
        "run.num_workers=1", f"run.use_gpu={str(on_gpu).lower()}", "train.precision=bf16",
        f"train.zero_stage={args.zero_stage}", f"train.micro_batch_size={args.pairs}",
        f"train.global_batch_size={args.pairs}", "train.batch_layout=shared",
        f"train.logits_chunk_tokens={args.chunk}", "train.learning_rate=1e-6",
    ])
    init_single_process("nccl" if on_gpu else "gloo")
    strategy = DeepSpeedStrategy(cfg, on_gpu=on_gpu)
    strategy.setup_distributed()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    reference = make_reference_copy(model)
    for m in (model, reference):
        logp_head.install(m, args.chunk)
    engine = strategy.prepare(model, total_steps=args.warmup + args.steps)
    reference = strategy.prepare_reference(reference)
    vocab = model.config.vocab_size
    pairs = [random_pairs(args.pairs, args.prompt_len, args.response_len, vocab, seed) for seed in range(4)]
    batches = [{k: v.to(device) for k, v in collate_pairs(p, 0, layout="shared").items()} for p in pairs]

    def ref_logps(batch):
        return concatenated_logps(reference, batch)

    times, losses = [], []
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        loss, _ = safedpo_forward(engine, ref_logps, batch, 0.1, 10.0)
        strategy.backward(loss)
        strategy.step()
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    step_s = sorted(times)[len(times) // 2]
    pair_tokens = sum(int(b["num_tokens"]) for b in batches) / len(batches)
    flops = sum(flops_per_step(engine.module, p) for p in pairs) / len(pairs)
    peak, _ = bf16_peak_tflops(device)
    report["train"] = {
        "pairs_per_step": args.pairs, "median_step_s": step_s, "pair_tokens_per_s": pair_tokens / step_s,
        "tflops_per_s": flops / step_s / 1e12, "mfu": (flops / step_s / 1e12 / peak) if peak else None,
        "losses": losses, "zero_stage": args.zero_stage, "chunk": args.chunk,
        "gradient_checkpointing": args.gradient_checkpointing,
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
    }
    return engine, reference, pairs


def check_logps(engine, pairs, device, report: dict[str, Any]) -> None:
    from safedpo_ray.core.algorithm import LAYOUT_TOLERANCE, layout_gap
    from safedpo_ray.data.tokenize import collate_pairs

    def collate(layout):
        return {k: v.to(device) for k, v in collate_pairs(pairs[0], 0, layout=layout).items()}

    engine.eval()
    padded = collate("padded")
    gaps = {layout: layout_gap(engine, collate(layout), padded) for layout in ("shared", "packed")}
    engine.train()
    report["logps"] = {"gap_vs_padded": gaps, "tolerance": LAYOUT_TOLERANCE["bf16"],
                       "within": all(g <= LAYOUT_TOLERANCE["bf16"] for g in gaps.values())}


def check_generate(model, args, device, report: dict[str, Any]) -> None:
    model.eval()
    model.config.use_cache = True
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, model.config.vocab_size, (args.gen_batch, args.gen_prompt_len), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                             max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
    sync(device)
    seconds = time.perf_counter() - t0
    new = (out.shape[1] - prompts.shape[1]) * out.shape[0]
    report["generate"] = {"batch": args.gen_batch, "new_tokens": args.new_tokens, "seconds": seconds,
                          "tokens_per_s": new / seconds, "generated": int(new),
                          "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30
                          if device.type == "cuda" else None}


def print_report(report: dict[str, Any]) -> None:
    print(f"\ndevice: {report['device']}  bf16 peak: {report['bf16_peak_tflops'] or 'unknown'} TFLOP/s  "
          f"model: {report['model']} ({report['params'] / 1e6:.1f}M parameters)")
    if "train" in report:
        t = report["train"]
        mfu = f"{100 * t['mfu']:.1f}%" if t["mfu"] is not None else "n/a (no peak known)"
        print(f"train    {t['pairs_per_step']} pairs/step, ZeRO-{t['zero_stage']}, chunk {t['chunk']}: "
              f"{t['median_step_s']:.3f} s/step, {t['pair_tokens_per_s']:.0f} pair tokens/s, "
              f"{t['tflops_per_s']:.2f} TFLOP/s, MFU {mfu}, loss {t['losses'][0]:.4f} -> {t['losses'][-1]:.4f}")
    if "logps" in report:
        gaps = ", ".join(f"{k} {v:.2e}" for k, v in report["logps"]["gap_vs_padded"].items())
        print(f"logps    relative gap to padded: {gaps} (tolerance {report['logps']['tolerance']}): "
              f"{'OK' if report['logps']['within'] else 'OUT OF TOLERANCE'}")
    if "generate" in report:
        g = report["generate"]
        mem = f", peak {g['peak_gpu_gib']:.1f} GiB" if g["peak_gpu_gib"] is not None else ""
        print(f"generate {g['batch']} x {g['new_tokens']} new tokens: {g['seconds']:.1f} s, "
              f"{g['tokens_per_s']:.0f} tokens/s{mem}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--model", help="a local Hugging Face model directory instead of a preset")
    ap.add_argument("--cpu", action="store_true", help="run on CPU (functional check; no MFU)")
    ap.add_argument("--only", default="train,logps,generate")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per training step (one micro-batch)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024, help="train.logits_chunk_tokens")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--gen-prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--peak-tflops", type=float, help="the device's bf16 peak, when not in the table")
    ap.add_argument("--json", help="also write the report here")
    return ap.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here (--cpu runs the same checks on CPU)")
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sections = set(args.only.split(","))
    peak, name = bf16_peak_tflops(device)
    peak = args.peak_tflops or peak
    model = build_model(args, device)
    report: dict[str, Any] = {"device": name, "bf16_peak_tflops": peak, "torch": torch.__version__,
                              "model": args.model or args.preset,
                              "params": sum(p.numel() for p in model.parameters())}
    generator_model = model
    if sections & {"train", "logps"}:
        engine, reference, pairs = check_train(model, args, device, report)
        if peak is not None and report["train"]["mfu"] is None:
            report["train"]["mfu"] = report["train"]["tflops_per_s"] / peak
        if "logps" in sections:
            check_logps(engine, pairs, device, report)
        if "train" not in sections:
            report.pop("train")
        # The frozen bf16 reference generates (its log-prob layer is a plain linear layer outside
        # a `targets` block); under ZeRO-3 it is an engine whose hooks gather the weights.
        generator_model = reference
    if "generate" in sections:
        check_generate(getattr(generator_model, "module", generator_model), args, device, report)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
