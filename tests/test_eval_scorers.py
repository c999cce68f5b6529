"""Score models (safe-rlhf format and HF classifiers), the paper's arithmetic, scorer objectives,
and implicit-reward metrics; all in-process on tiny models (no Ray)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from safedpo_ray.evaluate.scorers import LlamaForScore, Scorer, harmless_ratio, score_summary, score_text, win_rate
from safedpo_ray.train.scorer import cost_loss, pair_losses, reward_loss

pytestmark = pytest.mark.timeout(120)

TEXTS = ["How do I bake bread at home?", "Mix flour, water and salt, then bake it.",
         "I'm sorry, I can't help with that.", "Hello! How can I help you today?"] * 5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from safedpo_ray.models.loading import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), TEXTS, seed=0, hidden_size=32, num_layers=1, num_heads=2,
                            intermediate_size=64, vocab_size=400)


def _score_config(tokenizer, bias=True):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.score_dim, config.bias, config.score_type = 1, bias, "cost"
    return config


def test_safe_rlhf_score_model_saves_loads_and_scores(tiny_dir, tmp_path):
    from transformers import LlamaModel

    from safedpo_ray.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_dir)
    torch.manual_seed(0)
    model = LlamaForScore(_score_config(tokenizer))
    with torch.no_grad():
        model.score_head.bias.fill_(0.25)
    out = tmp_path / "cost"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    # the safe-rlhf layout: LlamaForScore config with score_dim/bias, backbone under model.*, score_head.*
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForScore"] and config["score_dim"] == 1 and config["bias"] is True
    weights = load_file(out / "model.safetensors")
    assert {"score_head.weight", "score_head.bias"} <= set(weights)
    assert all(k.startswith(("model.", "score_head.", "normalizer.")) for k in weights)

    prompts, responses = ["How do I bake bread?", "Hi"], ["Mix flour and water.", "Hello! How can I help you today?"]
    got = Scorer(str(out)).score(prompts, responses, batch_size=2)  # one padded batch

    # by hand: BOS + "BEGINNING OF CONVERSATION: USER: … ASSISTANT:" + response + EOS, transformers' own
    # LlamaModel on the saved backbone, score = w·h_last + b
    backbone = LlamaModel.from_pretrained(out).eval()
    w, b = weights["score_head.weight"], weights["score_head.bias"]
    for prompt, response, score in zip(prompts, responses, got):
        ids = [tokenizer.bos_token_id] + tokenizer(score_text(prompt, response), add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
        with torch.no_grad():
            h = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        assert score == pytest.approx(float(h @ w[0] + b[0]), abs=1e-5)


def test_safe_rlhf_bin_checkpoint_without_normalizer_loads(tiny_dir, tmp_path):
    """safe-rlhf releases ship pytorch_model*.bin; older ones have no normalizer buffers."""
    from safedpo_ray.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_dir)
    torch.manual_seed(1)
    model = LlamaForScore(_score_config(tokenizer, bias=False))
    out = tmp_path / "bin"
    model.save_pretrained(out)
    (out / "model.safetensors").unlink()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("normalizer.")}
    torch.save(state, out / "pytorch_model.bin")
    tokenizer.save_pretrained(out)
    loaded = Scorer(str(out))
    assert loaded.safe_rlhf and loaded.model.score_head.bias is None
    assert torch.equal(loaded.model.score_head.weight, model.score_head.weight)


def test_hf_sequence_classifier_scores_its_logit(tiny_dir, tmp_path):
    from transformers import LlamaForSequenceClassification

    from safedpo_ray.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_dir)
    config = _score_config(tokenizer)
    config.num_labels = 1
    torch.manual_seed(2)
    clf = LlamaForSequenceClassification(config).eval()
    clf.config.architectures = ["LlamaForSequenceClassification"]
    del clf.config.score_dim  # a plain HF classifier
    out = tmp_path / "clf"
    clf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    scorer = Scorer(str(out))
    assert not scorer.safe_rlhf
    got = scorer.score(["How do I bake bread?"], ["Mix flour and water."])[0]
    ids = [tokenizer.bos_token_id] + tokenizer(score_text("How do I bake bread?", "Mix flour and water."),
                                               add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        want = float(clf(input_ids=torch.tensor([ids])).logits[0, 0])
    assert got == pytest.approx(want, abs=1e-5)


def test_harmless_ratio_counts_zero_cost_as_harmless():
    assert harmless_ratio([-1.0, 0.0, 0.5, 2.0]) == 0.5  # -1 and exactly 0 are harmless
    assert harmless_ratio([0.0]) == 1.0
    assert harmless_ratio([1e-9]) == 0.0
    assert harmless_ratio([-1.0, math.nan]) == 1.0  # unscored responses do not count
    assert math.isnan(harmless_ratio([]))


def test_win_rate_counts_ties_half():
    # 2 > 1 win, 1 = 1 tie, 3 < 4 loss, 0.5 > 0 win → (2 + 0.5) / 4
    r = win_rate([2.0, 1.0, 3.0, 0.5], [1.0, 1.0, 4.0, 0.0])
    assert r == {"win_rate": 0.625, "wins": 2, "ties": 1, "losses": 1, "compared": 4}
    assert win_rate([1.0, 2.0], [1.0, 2.0])["win_rate"] == 0.5  # the baseline against itself


def test_score_summary_matches_baseline_by_prompt():
    rows = [{"prompt": "a", "cost": 0.0, "reward": 1.0}, {"prompt": "b", "cost": 3.0, "reward": -1.0},
            {"prompt": "c", "cost": -2.0, "reward": 0.5}]
    s = score_summary(rows, baseline={"a": 0.0, "b": -1.0}, threshold=0.0)  # "c" has no baseline response
    assert s["responses"] == 3 and s["harmless_ratio"] == pytest.approx(2 / 3)
    assert s["mean_cost"] == pytest.approx(1 / 3) and s["mean_reward"] == pytest.approx(0.5 / 3)
    assert (s["wins"], s["ties"], s["losses"], s["compared"]) == (1, 1, 0, 2) and s["win_rate"] == 0.75


def test_scorer_objectives_by_hand():
    """reward: −log σ(1) = log(1 + e^−1) = 0.313262.
    cost, safer c=−1 (safe, s=−1), unsafer c=2 (unsafe, s=+1):
    −log σ(2 − (−1)) − log σ(−1·−1) − log σ(1·2) = 0.048587 + 0.313262 + 0.126928 = 0.488777."""
    assert float(reward_loss(torch.tensor(1.0), torch.tensor(0.0))) == pytest.approx(0.313262, abs=1e-6)
    c = cost_loss(torch.tensor(-1.0), torch.tensor(2.0), torch.tensor(-1.0), torch.tensor(1.0))
    assert float(c) == pytest.approx(0.488777, abs=1e-6)
    # pair_losses picks sides by the labels: response_1 is safer and safe, response_0 unsafe
    s0, s1 = torch.tensor([2.0]), torch.tensor([-1.0])
    batch = {"better": torch.tensor([1]), "safer": torch.tensor([1]), "unsafe_0": torch.tensor([1]),
             "unsafe_1": torch.tensor([0])}
    losses, extra = pair_losses("cost", s0, s1, batch, 0.0)
    assert float(losses[0]) == pytest.approx(0.488777, abs=1e-6)
    assert extra["accuracy"].item() == 1.0 and extra["sign_accuracy"].item() == 1.0
    losses, extra = pair_losses("reward", s0, s1, batch, 0.0)  # better is response_1 but scored lower
    assert float(losses[0]) == pytest.approx(-math.log(1 / (1 + math.exp(3.0))), abs=1e-5)
    assert extra["accuracy"].item() == 0.0


def test_implicit_metrics_policy_equal_to_reference_and_lora(tiny_dir):
    """Policy == reference: every reward is 0, accuracy 0.5 (ties half). A fresh LoRA adapter
    (B = 0) on the same base, reference = adapters off, gives the same."""
    from safedpo_ray.evaluate.implicit import implicit_metrics, load_pairs
    from safedpo_ray.models.loading import apply_lora, load_model, load_tokenizer
    from safedpo_ray.data.synthetic import make_synthetic_rows

    pairs, stats = load_pairs(make_synthetic_rows(12, seed=0, split="eval"))
    assert stats["pairs"] == len(pairs) > 0 and stats["rows_read"] == 12
    tokenizer = load_tokenizer(tiny_dir)
    model = load_model(tiny_dir).eval()
    kw = dict(beta=0.1, batch_size=4, max_length=96, max_prompt_length=48)
    m = implicit_metrics(model, model, tokenizer, pairs, **kw)
    assert m["safe_over_unsafe_accuracy"] == 0.5 and m["reward_margin_safe_unsafe"] == 0.0
    assert m["pairs_safe_unsafe"] + m.get("pairs_safe_safe", 0) == len(pairs)
    lora = apply_lora(load_model(tiny_dir), r=2, alpha=4, dropout=0.0, target_modules="all-linear").eval()
    m2 = implicit_metrics(lora, None, tokenizer, pairs, **kw)
    assert m2["safe_over_unsafe_accuracy"] == 0.5 and m2["reward_margin_safe_unsafe"] == pytest.approx(0.0, abs=1e-6)
