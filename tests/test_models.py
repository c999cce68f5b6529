"""Tests for safedpo_ray.models.loading: tiny build, loading (incl. GGUF), LoRA, reference, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from safedpo_ray.models.loading import (
    apply_lora,
    build_tiny_model,
    convert_gguf,
    count_parameters,
    export_model,
    load_model,
    load_tokenizer,
    make_reference_copy,
    reference_logits_context,
)

TEXTS = [
    f"USER: how do I {verb} the {noun}? ASSISTANT: you {verb} the {noun} with care, step {i}."
    for i, (verb, noun) in enumerate(
        (v, n) for v in ("fix", "open", "clean", "build", "paint") for n in ("door", "car", "lamp", "garden")
    )
] * 10
SAMPLE = "how do I open the garden? you build the lamp, step 42 é!"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TEXTS, seed=3, vocab_size=400)


def _ids(tokenizer, text=SAMPLE) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


# --------------------------------------------------------------------------- tiny model


def test_tiny_build_deterministic_and_idempotent(tmp_path, tiny_dir):
    again = build_tiny_model(tmp_path / "again", TEXTS, seed=3, vocab_size=400)
    other_seed = build_tiny_model(tmp_path / "other", TEXTS, seed=4, vocab_size=400)
    ref = load_file(str(tiny_dir / "model.safetensors"))
    same = load_file(str(again / "model.safetensors"))
    assert ref.keys() == same.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    diff = load_file(str(other_seed / "model.safetensors"))
    assert any(not torch.equal(ref[k], diff[k]) for k in ref)
    vocab = json.loads((tiny_dir / "tokenizer.json").read_text())["model"]
    assert vocab == json.loads((again / "tokenizer.json").read_text())["model"]

    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(again, ["different texts"], seed=99) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp


def test_tiny_roundtrip_and_forward(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    model = load_model(tiny_dir)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token_id is not None and tok.bos_token_id not in (tok.eos_token_id, tok.pad_token_id)
    assert tok.padding_side == "right" and not tok.chat_template
    assert tok.decode(tok(SAMPLE, add_special_tokens=False)["input_ids"]) == SAMPLE
    assert model.config.vocab_size == len(tok) <= 400
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = _ids(tok)
    logits = _logits(model, ids)
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())


def test_load_model_bfloat16(tiny_dir):
    model = load_model(tiny_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError):
        load_model(tiny_dir, dtype="int8")


def test_load_tokenizer_pad_falls_back_to_eos(tmp_path, tiny_dir):
    tok = load_tokenizer(tiny_dir)
    tok.pad_token = None
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path / "nopad")
    reloaded = load_tokenizer(tmp_path / "nopad")
    assert reloaded.pad_token == reloaded.eos_token and reloaded.padding_side == "right"


# --------------------------------------------------------------------------- GGUF


def _write_llama_gguf(model_dir: Path, path: Path) -> None:
    """Export the tiny Llama + byte-level BPE tokenizer as an F32 GGUF file, llama.cpp style."""
    gguf = pytest.importorskip("gguf", reason="the `gguf` package is needed to write a GGUF file")
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    state = load_file(str(model_dir / "model.safetensors"))
    n_layers, n_head, n_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    special = {t["id"] for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    def permute(w: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's q/k rotary layout
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for key, value in state.items():
        if key == "lm_head.weight":  # tied: GGUF without output.weight means tied embeddings
            continue
        base, suffix = key.rsplit(".", 1)
        array = value.float().numpy()
        if key.endswith("q_proj.weight"):
            array = permute(array, n_head)
        elif key.endswith("k_proj.weight"):
            array = permute(array, n_kv)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_load_and_convert(tmp_path, tiny_dir):
    gguf_path = tmp_path / "tiny-f32.gguf"
    _write_llama_gguf(tiny_dir, gguf_path)
    ref_tok, ref_model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    ids = _ids(ref_tok)

    direct = load_model(tmp_path, gguf_file=gguf_path.name)
    assert getattr(direct, "hf_quantizer", None) is None and not getattr(direct, "is_quantized", False)
    assert getattr(direct.config, "quantization_config", None) is None
    assert all(p.requires_grad for p in direct.parameters())
    torch.testing.assert_close(_logits(direct, ids), _logits(ref_model, ids), rtol=0, atol=1e-5)
    direct(input_ids=ids, labels=ids).loss.backward()  # a normal trainable model

    out = convert_gguf(tmp_path, gguf_path.name, tmp_path / "converted")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    conv_tok, conv_model = load_tokenizer(out), load_model(out)
    assert conv_tok(SAMPLE)["input_ids"] == ref_tok(SAMPLE)["input_ids"]
    assert (conv_tok.bos_token_id, conv_tok.eos_token_id, conv_tok.pad_token_id) == (
        ref_tok.bos_token_id, ref_tok.eos_token_id, ref_tok.pad_token_id)
    torch.testing.assert_close(_logits(conv_model, ids), _logits(ref_model, ids), rtol=0, atol=1e-5)

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(tmp_path, gguf_path.name, out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------- LoRA / reference / export


class _Wrapper(torch.nn.Module):  # stands in for a DeepSpeed engine exposing `.module`
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def _perturb_lora(model) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def test_lora_reference_context_and_export(tmp_path, tiny_dir):
    from peft import PeftModel

    tok = load_tokenizer(tiny_dir)
    ids = _ids(tok)
    base_logits = _logits(load_model(tiny_dir), ids)

    model = apply_lora(load_model(tiny_dir), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    assert isinstance(model, PeftModel)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(_logits(model, ids), base_logits)  # lora_B starts at zero

    _perturb_lora(model)
    live = _logits(model, ids)
    assert (live - base_logits).abs().max() > 1e-3
    with reference_logits_context(model):
        torch.testing.assert_close(_logits(model, ids), base_logits, rtol=0, atol=1e-6)
    wrapped = _Wrapper(model)
    with reference_logits_context(wrapped):
        torch.testing.assert_close(_logits(wrapped, ids), base_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model, ids), live)  # adapters re-enabled afterwards

    out = export_model(model, tok, tmp_path / "export", merge_lora=True)
    for sub in ("adapter", "merged"):
        assert (out / sub / "tokenizer.json").exists() and (out / sub / "tokenizer_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "merged" / "model.safetensors").exists()
    assert not list((out / "merged").glob("*.bin")) and not list((out / "adapter").glob("*.bin"))
    merged = load_model(out / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged, ids), live, rtol=0, atol=1e-4)
    torch.testing.assert_close(_logits(model, ids), live)  # live model untouched by the merge
    assert any("lora_B" in n for n, _ in model.named_parameters())

    reloaded = PeftModel.from_pretrained(load_model(tiny_dir), out / "adapter")
    torch.testing.assert_close(_logits(reloaded, ids), live, rtol=0, atol=1e-5)

    only_adapter = export_model(model, tok, tmp_path / "adapter_only")
    assert (only_adapter / "adapter").is_dir() and not (only_adapter / "merged").exists()


def test_all_linear_plain_reference_and_plain_export(tmp_path, tiny_dir):
    tok = load_tokenizer(tiny_dir)
    ids = _ids(tok)
    lora = apply_lora(load_model(tiny_dir), r=2, alpha=4, dropout=0.05, target_modules="all-linear")
    targeted = {n.split(".")[-1] for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= targeted

    model = load_model(tiny_dir)
    ref = make_reference_copy(_Wrapper(model))
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert ref.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    before = _logits(model, ids)
    with reference_logits_context(model):  # no-op for a plain model
        torch.testing.assert_close(_logits(model, ids), before)
    torch.testing.assert_close(_logits(ref, ids), before)

    out = export_model(model, tok, tmp_path / "plain", merge_lora=True)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "adapter").exists()
    torch.testing.assert_close(_logits(load_model(out), ids), before)
