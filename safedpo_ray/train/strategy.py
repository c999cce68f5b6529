"""Everything DeepSpeed: config, engines, backward/step, all-reduce, checkpoints, gathering.

The training loop talks only to `DeepSpeedStrategy`; no other module imports deepspeed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from safedpo_ray.config.training import Config
from safedpo_ray.train.checkpoints import write_manifest

CHECKPOINT_TAG = "state"

# Plain data classes DeepSpeed pickles into its checkpoints (loss scaler, ZeRO stage, the
# fragment map of ZeRO-1/2 optimizer shards); everything else must be tensors and builtins.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_globals() -> list[Any]:
    import importlib

    found = []
    for qualname in DEEPSPEED_SAFE_GLOBALS:
        module, _, name = qualname.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: not pickled there
            continue
    return found


def weights_only_loads(engine) -> None:
    """DeepSpeed's torch checkpoint engine calls `torch.load(..., weights_only=False)`, which runs
    any pickle a checkpoint holds. Load with `weights_only=True` instead, allowing only the few
    plain DeepSpeed classes its checkpoints contain."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if type(checkpoint_engine).__name__ != "TorchCheckpointEngine":
        return  # other engines (fast, decoupled) already use torch.load's weights_only default

    def load(path, map_location=None):
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load


def build_ds_config(cfg: Config, *, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed JSON config from our dataclasses (the only place these keys are written)."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        # Gather whole parameters per layer without persistence tricks: small models on CPU and
        # large ones on GPU both train; 16-bit gathering lets rank 0 export a full state dict.
        zero.update(
            stage3_param_persistence_threshold=0 if not on_gpu else 1e4,
            stage3_prefetch_bucket_size=0 if not on_gpu else 5e7,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.learning_rate,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                # torch's AdamW everywhere: DeepSpeed's CPU Adam and FusedAdam compile an op on
                # first use (~30 s on CPU; on GPUs against whatever CUDA toolkit the node has,
                # which need not match torch's). On GPUs torch's fused CUDA kernel (no build).
                "torch_adam": True,
                **({"fused": True} if on_gpu else {}),
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def warmup_steps(cfg: Config, total_steps: int) -> int:
    return round(cfg.train.warmup_ratio * total_steps)


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warmup that starts at
    1/warmup of the peak (no step is spent at lr 0; DeepSpeed's WarmupCosineLR starts at 0), then
    cosine decay that would reach `min_ratio` one step after the last (so the last step still
    learns when min_ratio is 0)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DeepSpeedStrategy:
    """Owns the DeepSpeed engine of the policy (and of the reference under ZeRO-3)."""

    def __init__(self, cfg: Config, *, on_gpu: bool):
        self.cfg = cfg
        self.on_gpu = on_gpu
        self.engine = None
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
        import deepspeed

        if not on_gpu:
            # The shared-memory comm op compiles for ~30-40 s on first use; gloo is enough on CPU.
            # Reading `__compatible_ops__` would first probe every op (compiler runs, ~0.1-0.4 s per
            # worker); only this entry is read on CPU (deepspeed.comm's shm check), so set it alone.
            ops = deepspeed.ops
            compatible = vars(ops).get("__compatible_ops__")
            if compatible is None:
                ops.__compatible_ops__ = compatible = {}
            compatible["deepspeed_shm_comm"] = False
        self._ds = deepspeed

    # -- process group -------------------------------------------------------------------------
    def setup_distributed(self) -> None:
        # Ray Train already created the torch process group; DeepSpeed reuses it.
        self._ds.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo")

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if self.on_gpu:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32

    # -- engines -------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, total_steps: int):
        self.ds_config = build_ds_config(self.cfg, on_gpu=self.on_gpu)
        params = [p for p in model.parameters() if p.requires_grad]
        multiplier = functools.partial(
            warmup_cosine, warmup=warmup_steps(self.cfg, total_steps), total=total_steps,
            min_ratio=self.cfg.train.min_lr_ratio,
        )
        # A torch scheduler handed to DeepSpeed: stepped at each optimizer step and saved in
        # DeepSpeed checkpoints like its own schedulers.
        self.engine, _, _, _ = self._ds.initialize(
            model=model, model_parameters=params, config=self.ds_config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier),
        )
        weights_only_loads(self.engine)
        return self.engine

    def prepare_reference(self, ref_model: torch.nn.Module) -> torch.nn.Module:
        """A frozen reference: partitioned like the policy under ZeRO-3, else a plain module."""
        # Cast on the host, then move: the device never holds a float32 copy.
        # Cast parameters only, as DeepSpeed does for the policy: `.to(dtype)` would also cast
        # float buffers (rotary inv_freq), and the reference's log-probs would drift from the
        # policy's at step 0 (measured: logits off by 8e-3 in bf16).
        for p in ref_model.parameters():
            p.data = p.data.to(self.compute_dtype)
        ref_model = ref_model.to(self.device)
        if self.cfg.train.zero_stage != 3:
            return ref_model.eval()
        config = {
            k: v for k, v in self.ds_config.items() if k not in ("optimizer", "scheduler")
        }
        engine, *_ = self._ds.initialize(model=ref_model, config=config)
        engine.eval()
        return engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        # DeepSpeed counts micro-steps and only updates at the accumulation boundary.
        self.engine.step()

    def current_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.world_size > 1:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu()

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        """Every rank writes its shard of model/optimizer/scheduler state into `directory`."""
        self.engine.save_checkpoint(
            str(directory),
            tag=CHECKPOINT_TAG,
            # Under one key of our own: DeepSpeed mixes its metadata into the dict it returns.
            client_state={"safedpo": client_state},
            exclude_frozen_parameters=self.cfg.model.lora.enabled,
        )
        # Last: the manifest that makes this rank's part of the checkpoint count as whole.
        write_manifest(directory, rank=self.rank, world_size=self.world_size, step=client_state.get("step"))

    def load(self, directory: str | Path) -> dict[str, Any]:
        _, client_state = self.engine.load_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, load_module_strict=not self.cfg.model.lora.enabled
        )
        if client_state is None or "safedpo" not in client_state:
            raise RuntimeError(f"no safedpo-ray DeepSpeed checkpoint found in {directory}")
        return client_state["safedpo"]

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[torch.nn.Module]:
        """The policy module with whole (un-partitioned) parameters, on every rank."""
        module = self.engine.module
        if self.cfg.train.zero_stage == 3:
            with self._ds.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield module
        else:
            yield module
