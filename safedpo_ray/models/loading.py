"""Model and tokenizer helpers: tiny offline models, loading (incl. GGUF), LoRA, reference, export."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from safedpo_ray.config.training import TINY_PRESET  # noqa: F401  (defined torch-free there; re-exported)
from safedpo_ray.runtime.safe_loading import explain_refused_pickle, weights_kwargs
from safedpo_ray.runtime.storage import localize, localize_light

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"

_TINY_MARKER = ".safedpo_tiny_complete"
_GGUF_MARKER = ".safedpo_gguf_complete"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "float32"/"bfloat16"/"float16" (or a torch.dtype) to a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip wrappers exposing `.module` (DeepSpeed engine, DDP)."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return model


# --------------------------------------------------------------------------- tiny model


def _train_tiny_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast  # alias of TokenizersBackend in transformers 5

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )


def is_tiny_model(output_dir: str | os.PathLike) -> bool:
    """Whether `output_dir` holds a completely written tiny model (its marker is written last)."""
    return (Path(output_dir) / _TINY_MARKER).exists()


def build_tiny_model(
    output_dir: str | os.PathLike,
    texts: list[str],
    *,
    seed: int = 0,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save it with a randomly initialised tiny Llama.

    Deterministic in (texts, seed, sizes). Idempotent: a directory holding the completion marker is
    returned as is. The marker is written last, so an interrupted build is redone.
    """
    out = Path(output_dir)
    marker = out / _TINY_MARKER
    if marker.exists():
        return out
    if not texts:
        raise ValueError("build_tiny_model needs at least one text to train the tokenizer")
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tiny_tokenizer(texts, vocab_size, max_position_embeddings)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    params = dict(seed=seed, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                  num_heads=num_heads, intermediate_size=intermediate_size,
                  max_position_embeddings=max_position_embeddings, num_texts=len(texts))
    marker.write_text(json.dumps(params, indent=2))
    return out


# --------------------------------------------------------------------------- loading


def load_tokenizer(name_or_path, *, gguf_file: str | None = None, trust_remote_code: bool = False):
    """AutoTokenizer with a pad token (falls back to EOS) and right padding."""
    from transformers import AutoTokenizer


    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    # s3://...: its tokenizer and config files fetched once per node, never the weights
    tokenizer = AutoTokenizer.from_pretrained((localize if gguf_file else localize_light)(name_or_path), **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _gguf_source(name_or_path, gguf_file: str) -> str:
    """Directory/repo argument for a GGUF load; an existing absolute file may come without one."""
    if name_or_path:
        return str(name_or_path)
    return str(Path(gguf_file).resolve().parent)


def load_model(
    name_or_path,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> nn.Module:
    """AutoModelForCausalLM for a hub id or local dir; a GGUF file is dequantized into a plain model."""
    from transformers import AutoModelForCausalLM


    torch_dtype = resolve_dtype(dtype)
    if not gguf_file:
        source = localize(name_or_path)  # a storage URI (s3://, gs://) is fetched once per node
        with explain_refused_pickle(name_or_path):  # safetensors, or torch.load(weights_only=True)
            return AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **weights_kwargs(source))

    kwargs: dict[str, Any] = {}
    try:  # ask for dense weights rather than packed GGUF blocks where the quantizer supports it
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_file, dequantize=True)
    except (ImportError, TypeError):  # pragma: no cover - older transformers
        pass
    loaded = AutoModelForCausalLM.from_pretrained(
        _gguf_source(name_or_path, gguf_file),
        gguf_file=gguf_file,
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    # transformers flags GGUF models as quantized (is_trainable False): rebuild a plain model.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    del loaded
    return model.to(torch_dtype)


def convert_gguf(model_dir, gguf_file: str, output_dir: str | os.PathLike) -> Path:
    """Save a GGUF checkpoint as a plain safetensors Hugging Face checkpoint (idempotent)."""
    from transformers import AutoTokenizer

    out = Path(output_dir)
    marker = out / _GGUF_MARKER
    if marker.exists():
        return out
    source = _gguf_source(model_dir, gguf_file)
    model = load_model(source, gguf_file=gguf_file, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps({"source": source, "gguf_file": str(gguf_file)}))
    return out


# --------------------------------------------------------------------------- LoRA / reference


def apply_lora(model: nn.Module, *, r: int, alpha: int, dropout: float, target_modules: list[str] | str):
    """Wrap `model` in a LoRA PeftModel (CAUSAL_LM); `target_modules="all-linear"` is allowed."""
    from peft import LoraConfig, TaskType, get_peft_model

    if isinstance(target_modules, (list, tuple)):
        target_modules = list(target_modules)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
    )
    return get_peft_model(model, config)


def apply_lora_config(model: nn.Module, model_cfg) -> nn.Module:
    """LoRA adapters as `model.lora` says (['all-linear']: every linear layer but the output head);
    with gradient checkpointing the inputs require grads, so the frozen base passes them on."""
    lora = model_cfg.lora
    target = lora.target_modules[0] if lora.target_modules == ["all-linear"] else lora.target_modules
    model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=target)
    if model_cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(_unwrap(model), PeftModel)


@contextlib.contextmanager
def reference_logits_context(model: nn.Module) -> Iterator[None]:
    """Adapters disabled for a PeftModel (its base is the reference); a no-op otherwise."""
    inner = _unwrap(model)
    if is_peft_model(inner):
        with inner.disable_adapter():
            yield
    else:
        yield


def make_reference_copy(model: nn.Module) -> nn.Module:
    """Frozen deep copy in eval mode."""
    ref = copy.deepcopy(_unwrap(model))
    ref.eval()
    ref.requires_grad_(False)
    return ref


# --------------------------------------------------------------------------- export / stats


def export_model(model: nn.Module, tokenizer, output_dir, *, merge_lora: bool = False) -> Path:
    """Save in HF format (safetensors). PeftModel: `adapter/` and, with merge_lora, `merged/`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    inner = _unwrap(model)
    if is_peft_model(inner):
        adapter_dir = out / "adapter"
        inner.save_pretrained(adapter_dir, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(adapter_dir)
        if merge_lora:
            merged = copy.deepcopy(inner).merge_and_unload()
            merged_dir = out / "merged"
            merged.save_pretrained(merged_dir, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(merged_dir)
            del merged
    else:
        inner.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); uses `ds_numel` for ZeRO-3 partitioned parameters."""
    trainable = total = 0
    for p in _unwrap(model).parameters():
        n = int(getattr(p, "ds_numel", 0) or p.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
