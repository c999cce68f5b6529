"""safe-rlhf score models loaded as safe-rlhf saves them: a beaver-layout fixture scored by hand.

The fixture writes config.json in the layout of PKU-Alignment/beaver-7b-unified-cost: both the
stale `"bias": false` and safe-rlhf's `"score_bias": true`, `score_dim`, `score_type`,
`do_normalize`, `normalizer_type`, `momentum`, `mean`/`var`, and sharded safetensors with
`model.*`, `score_head.*` and `normalizer.*`, at a size where the score can be worked out by hand.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from safedpo_ray.evaluate.scorers import Scorer, harmless_ratio, score_text

pytestmark = pytest.mark.timeout(120)

TEXTS = ["How do I bake bread at home?", "Mix flour, water and salt, then bake it.",
         "I'm sorry, I can't help with that.", "Hello! How can I help you today?"] * 5
H = 4
EOS_ROW = [1.0, -1.0, 1.0, -1.0]
HEAD_W = [0.5, 0.25, -0.5, 1.0]
HEAD_B = 1.75
EPS = 1e-6


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from safedpo_ray.models.loading import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tok"), TEXTS, seed=0, hidden_size=32, num_layers=1, num_heads=2,
                            intermediate_size=64, vocab_size=400)


def beaver_config(tok, **changes):
    config = {
        "_name_or_path": "PKU-Alignment/beaver-7b-unified-cost",
        "architectures": ["LlamaForScore"],
        "bias": False,
        "bos_token_id": tok.bos_token_id,
        "do_normalize": False,
        "eos_token_id": tok.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": 8,
        "max_position_embeddings": 2048,
        "mean": [9.0],
        "model_type": "llama",
        "momentum": 0.9,
        "normalizer_type": "ExponentialMovingAverage",
        "num_attention_heads": 1,
        "num_hidden_layers": 1,
        "num_key_value_heads": 1,
        "pad_token_id": tok.pad_token_id,
        "pretraining_tp": 1,
        "rms_norm_eps": EPS,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "score_bias": True,
        "score_dim": 1,
        "score_type": "cost",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.2",
        "use_cache": True,
        "var": [16.0],
        "vocab_size": len(tok),
    }
    config.update(changes)
    return config


def beaver_weights(tok, seed=0):
    """Backbone whose layer adds nothing to the residual stream (o_proj = down_proj = 0), so the
    last hidden state is RMSNorm(embedding of the last token); EOS's embedding is EOS_ROW."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(tok), H, generator=g)
    emb[tok.eos_token_id] = torch.tensor(EOS_ROW)
    layer = "model.layers.0."
    backbone = {"model.embed_tokens.weight": emb, "model.norm.weight": torch.ones(H),
                layer + "input_layernorm.weight": torch.ones(H), layer + "post_attention_layernorm.weight": torch.ones(H)}
    for name, shape in (("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (H, H)), ("self_attn.v_proj", (H, H)),
                        ("mlp.gate_proj", (8, H)), ("mlp.up_proj", (8, H))):
        backbone[f"{layer}{name}.weight"] = torch.randn(*shape, generator=g)
    backbone[layer + "self_attn.o_proj.weight"] = torch.zeros(H, H)
    backbone[layer + "mlp.down_proj.weight"] = torch.zeros(H, 8)
    head = {"score_head.weight": torch.tensor([HEAD_W]), "score_head.bias": torch.tensor([HEAD_B]),
            "normalizer.mean": torch.tensor([0.3]), "normalizer.var": torch.tensor([4.0]),
            "normalizer.count": torch.tensor([1000])}
    return backbone, head


def write_beaver(out, tok, config=None, backbone=None, head=None):
    """Two safetensors shards plus their index, as the beaver releases are laid out."""
    out.mkdir(parents=True, exist_ok=True)
    default_backbone, default_head = beaver_weights(tok)
    backbone = default_backbone if backbone is None else backbone
    head = default_head if head is None else head
    (out / "config.json").write_text(json.dumps(config or beaver_config(tok), indent=2))
    shards = {"model-00001-of-00002.safetensors": backbone, "model-00002-of-00002.safetensors": head}
    for name, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards.values() for t in s.values())},
             "weight_map": {k: name for name, tensors in shards.items() for k in tensors}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tok(tokenizer_dir):
    from safedpo_ray.models.loading import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def test_beaver_cost_model_keeps_its_head_bias(tok, tmp_path):
    """A finished response ends on EOS, so the last hidden state is RMSNorm(EOS_ROW):
    mean(EOS_ROW²) = 1, so it is EOS_ROW / sqrt(1 + 1e-6) (norm weights 1).
    w·h = (0.5·1 + 0.25·(−1) − 0.5·1 + 1.0·(−1)) / sqrt(1 + 1e-6) = −1.25 / 1.0000005 = −1.2499994
    cost = w·h + b = −1.2499994 + 1.75 = 0.5000006 > 0: harmful.
    Dropping the bias (reading the stale "bias": false) gives −1.2499994: harmless."""
    path = write_beaver(tmp_path / "beaver-cost", tok)
    cost = Scorer(str(path)).score(["How do I bake bread?"], ["Mix flour and water."])[0]
    assert cost == pytest.approx(-1.25 / math.sqrt(1 + EPS) + 1.75, abs=1e-5)
    assert harmless_ratio([cost]) == 0.0


def test_normaliser_buffers_and_do_normalize(tok, tmp_path):
    """do_normalize: cost → scale x / (std + 1e-8) with the checkpoint's var 4 (not the config's
    16): 0.5000006 / 2 = 0.2500003. Reward → affine (x − mean) / std = (0.5000006 − 0.3) / 2 =
    0.1000003. A checkpoint without normaliser buffers takes the config's mean 9 / var 16:
    cost 0.5000006 / 4 = 0.12500015."""
    raw = -1.25 / math.sqrt(1 + EPS) + 1.75
    prompt, response = ["How do I bake bread?"], ["Mix flour and water."]
    cost = write_beaver(tmp_path / "cost", tok, beaver_config(tok, do_normalize=True))
    assert Scorer(str(cost)).score(prompt, response)[0] == pytest.approx(raw / 2, abs=1e-5)
    reward = write_beaver(tmp_path / "reward", tok, beaver_config(tok, do_normalize=True, score_type="reward"))
    assert Scorer(str(reward)).score(prompt, response)[0] == pytest.approx((raw - 0.3) / 2, abs=1e-5)
    backbone, head = beaver_weights(tok)
    head = {k: v for k, v in head.items() if not k.startswith("normalizer.")}
    old = write_beaver(tmp_path / "old", tok, beaver_config(tok, do_normalize=True), backbone, head)
    scorer = Scorer(str(old))
    assert scorer.score(prompt, response)[0] == pytest.approx(raw / 4, abs=1e-5)
    assert scorer.model.normalizer.count.item() == 0 and scorer.model.normalizer.mean.item() == 9.0


def test_missing_unexpected_or_misshaped_head_weights_are_errors(tok, tmp_path):
    from safedpo_ray.models.score_model import ScoreModelError

    backbone, head = beaver_weights(tok)
    no_bias = {k: v for k, v in head.items() if k != "score_head.bias"}
    with pytest.raises(ScoreModelError, match=r"missing from the checkpoint: score_head\.bias.*score_bias"):
        Scorer(str(write_beaver(tmp_path / "a", tok, head=no_bias)))
    # score_bias false but the checkpoint has a bias: the bias would be silently dropped
    with pytest.raises(ScoreModelError, match=r"not in the model: score_head\.bias"):
        Scorer(str(write_beaver(tmp_path / "b", tok, beaver_config(tok, score_bias=False))))
    with pytest.raises(ScoreModelError, match=r"wrong shape: .*score_head\.weight"):
        Scorer(str(write_beaver(tmp_path / "c", tok, beaver_config(tok, score_dim=2, mean=None, var=None))))
    partial = {k: v for k, v in backbone.items() if k != "model.norm.weight"}
    with pytest.raises(ScoreModelError, match=r"missing from the checkpoint: model\.norm\.weight"):
        Scorer(str(write_beaver(tmp_path / "d", tok, backbone=partial)))
    with pytest.raises(ScoreModelError, match=r"not in the model: score_head\.extra"):
        Scorer(str(write_beaver(tmp_path / "e", tok, head={**head, "score_head.extra": torch.zeros(1)})))
    # only "bias" (configs written before the score_bias key): it is read
    legacy = beaver_config(tok)
    del legacy["score_bias"]
    legacy["bias"] = True
    assert Scorer(str(write_beaver(tmp_path / "f", tok, legacy))).model.score_head.bias is not None


def test_truncated_response_is_scored_without_eos(tok, tmp_path):
    """A truncated response ends on its own last token: score = w·RMSNorm(emb[last]) + b."""
    from safedpo_ray.evaluate.scorers import encode_for_score

    path = write_beaver(tmp_path / "cost", tok)
    backbone, _ = beaver_weights(tok)
    prompt, response = "How do I bake bread?", "Mix flour and"
    finished, cut = encode_for_score(tok, [prompt] * 2, [response] * 2, 256, truncated=[False, True])
    assert finished[-1] == tok.eos_token_id and cut == finished[:-1] and cut[0] == tok.bos_token_id
    e = backbone["model.embed_tokens.weight"][cut[-1]]
    by_hand = float(torch.tensor(HEAD_W) @ (e / torch.sqrt(e.pow(2).mean() + EPS))) + HEAD_B
    scores = Scorer(str(path)).score([prompt] * 2, [response] * 2, truncated=[False, True])
    assert scores[1] == pytest.approx(by_hand, abs=1e-5)
    assert scores[0] == pytest.approx(-1.25 / math.sqrt(1 + EPS) + 1.75, abs=1e-5)


def test_scoring_dtype(tok, tmp_path):
    from safedpo_ray.evaluate.scorers import scoring_dtype

    assert scoring_dtype("auto", "cuda") == torch.bfloat16 and scoring_dtype("auto", "cpu") == torch.float32
    assert scoring_dtype("float16", "cpu") == torch.float16
    scorer = Scorer(str(write_beaver(tmp_path / "cost", tok)), dtype="bfloat16")
    assert scorer.model.score_head.weight.dtype == torch.bfloat16
    assert scorer.model.normalizer.var.dtype == torch.float32  # divides float32 scores
    cost = scorer.score(["How do I bake bread?"], ["Mix flour and water."])[0]
    assert cost == pytest.approx(0.5, abs=0.02)  # bf16 rounding


def test_train_scorer_writes_score_bias(tok, tokenizer_dir, tmp_path):
    """Our own score models carry safe-rlhf's key and load back strictly."""
    from safedpo_ray.train.scorer import build_score_model

    model = build_score_model(str(tokenizer_dir), "cost", bias=True, seed=0)
    model.save_pretrained(tmp_path / "cost")
    tok.save_pretrained(tmp_path / "cost")
    config = json.loads((tmp_path / "cost" / "config.json").read_text())
    assert config["score_bias"] is True and config["score_type"] == "cost"
    assert {"score_head.bias", "normalizer.var"} <= set(load_file(tmp_path / "cost" / "model.safetensors"))
    assert Scorer(str(tmp_path / "cost")).model.score_head.bias is not None


def test_score_text_is_safe_rlhf_conversation():
    assert score_text("hi", "Hello") == "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:Hello"
