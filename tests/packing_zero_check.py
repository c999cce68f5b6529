"""Run by tests/test_packing_zero.py in a fresh process (DeepSpeed keeps global state): under
DeepSpeed ZeRO-{2,3}, with and without LoRA, the packed + chunked path and the padded +
full-logits path give the same per-pair log-probs, losses and full gradients. One rank over gloo.
Prints one JSON line per case with the largest differences."""

import copy
import json
import os
import socket
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_packing import as_lora, random_pairs, tiny_llama  # noqa: E402

from safedpo_ray.core import logp_head  # noqa: E402
from safedpo_ray.core.algorithm import safedpo_forward  # noqa: E402
from safedpo_ray.config.training import load_config  # noqa: E402
from safedpo_ray.data.tokenize import collate_pairs  # noqa: E402
from safedpo_ray.train.strategy import DeepSpeedStrategy  # noqa: E402


def run(stage: int, lora: bool, model, batch):
    import deepspeed

    cfg = load_config(None, [f"train.zero_stage={stage}", "train.micro_batch_size=4", "train.global_batch_size=4", "run.num_workers=1",
                             "train.max_grad_norm=0", "train.learning_rate=1e-3"])
    s = DeepSpeedStrategy(cfg, on_gpu=False)
    s.setup_distributed()
    engine = s.prepare(model, total_steps=1)
    refs = (torch.full((4,), -40.0), torch.full((4,), -41.0))
    loss, per = safedpo_forward(engine, lambda b: refs, batch, beta=0.5, delta=2.0)
    engine.backward(loss)
    grads = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()
             if p.requires_grad}
    return per, grads


LAYOUT = sys.argv[1] if len(sys.argv) > 1 else "shared"


def main() -> None:
    rows = random_pairs(4)
    for stage in (2, 3):
        for lora in (False, True):
            base = tiny_llama()
            if lora:
                base = as_lora(base)
            fast = copy.deepcopy(base)
            assert logp_head.install(fast, 5) is not None
            ref_per, ref_grads = run(stage, lora, base, collate_pairs(rows, 0))
            packed = collate_pairs(rows, 0, layout=LAYOUT)
            per, grads = run(stage, lora, fast, packed)
            out = {"stage": stage, "lora": lora, "layout": LAYOUT, "rows": packed["input_ids"].shape[0],
                   "grads": len(grads), "grad_norm": sum(float(g.norm()) for g in ref_grads.values())}
            for key in ("logps/chosen", "logps/rejected", "loss"):
                out[key] = float((per[key] - ref_per[key]).abs().max())
            out["grad"] = max(float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads)
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
