"""SFT data and loss, without Ray: which responses are trained on, prompt masking, and a tiny model
whose response loss falls in a few steps. The Ray runs are in tests/test_sft_chain.py."""

import pytest
import torch

from safedpo_ray.config.training import ConfigError, load_config
from safedpo_ray.data.schema import SchemaError
from safedpo_ray.data.sft import (
    PLAIN, collate_examples, held_out_examples, sft_examples, sft_schema, tokenize_examples, validate_plain_rows,
)
from safedpo_ray.data.tokenize import tokenize_pairs
from safedpo_ray.train.sft_worker import response_nll


def pku(better, safe0, safe1, prompt="p?"):
    return {"prompt": prompt, "response_0": "zero", "response_1": "one", "is_response_0_safe": safe0,
            "is_response_1_safe": safe1, "better_response_id": better, "safer_response_id": 0}


@pytest.mark.parametrize("row,helpful_safe,all_safe", [
    (pku(0, True, True), ["zero"], ["zero", "one"]),     # both safe
    (pku(1, True, True), ["one"], ["zero", "one"]),
    (pku(0, True, False), ["zero"], ["zero"]),           # safe helpful winner over an unsafe loser
    (pku(0, False, True), [], ["one"]),                   # unsafe helpful winner: only its safe loser
    (pku(1, False, False), [], []),                       # both unsafe: nothing
])
def test_which_responses_are_trained_on(row, helpful_safe, all_safe):
    assert [e["response"] for e in sft_examples(row, "helpful_safe")] == helpful_safe
    assert [e["response"] for e in sft_examples(row, "all_safe")] == all_safe
    for e in sft_examples(row, "all_safe"):
        assert not e["unsafe"] and e["prompt"] == "p?"
    held = held_out_examples(row)
    assert [(e["response"], e["unsafe"]) for e in held] == [("zero", not row["is_response_0_safe"]),
                                                          ("one", not row["is_response_1_safe"])]
    with pytest.raises(ValueError):
        sft_examples(row, "everything")


def test_schema_detection_and_plain_rows():
    assert sft_schema({"prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                       "better_response_id", "safer_response_id"}) == "pku"
    assert sft_schema({"prompt", "chosen", "rejected", "chosen_unsafe", "rejected_unsafe"}) == "pairwise"
    assert sft_schema({"prompt", "response", "source"}) == PLAIN
    with pytest.raises(SchemaError, match="'prompt' and 'response'"):
        sft_schema({"question", "answer"})
    rows = [{"prompt": "a", "response": "b", "row_number": 1}, {"prompt": "a", "response": " ", "row_number": 2},
            {"prompt": 3, "row_number": 3}, {"__invalid__": "line is not valid JSON", "row_number": 4}]
    v = validate_plain_rows(rows)
    assert v.rows == [{"prompt": "a", "response": "b", "pair_id": 1}]
    reasons = {q["row_number"]: q["reasons"] for q in v.quarantined}
    assert reasons == {2: ["field 'response' is empty"],
                       3: ["field 'prompt' must be a string, got int", "missing field 'response'"],
                       4: ["line is not valid JSON"]}


def test_config_keys():
    assert load_config(None, ["sft.responses=all_safe"]).sft.responses == "all_safe"
    with pytest.raises(ConfigError, match="'sft.responses'"):
        load_config(None, ["sft.responses=unsafe"])
    with pytest.raises(ConfigError, match="unknown config key 'sft.epochs'"):
        load_config(None, ["sft.epochs=2"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from safedpo_ray.models.loading import build_tiny_model, load_model, load_tokenizer

    texts = ["How do I bake bread?", "Mix flour and water, then bake it.", "I cannot help with that.",
             "How do I start running?", "Run slowly and add a minute each week."] * 4
    path = build_tiny_model(tmp_path_factory.mktemp("sft") / "m", texts, seed=0, vocab_size=300)
    return load_model(path), load_tokenizer(path)


EXAMPLES = {"prompt": ["How do I bake bread?", "How do I start running?"],
            "response": ["Mix flour and water, then bake it.", "Run slowly and add a minute each week."]}


def test_tokenized_like_a_chosen_response_and_prompt_masked(tiny):
    model, tok = tiny
    out = tokenize_examples(dict(EXAMPLES), tok, max_length=64, max_prompt_length=32)
    pairs = tokenize_pairs({"prompt": EXAMPLES["prompt"], "chosen": EXAMPLES["response"],
                            "rejected": ["x", "y"]}, tok, max_length=64, max_prompt_length=32)
    assert out["prompt_ids"] == pairs["prompt_ids"] and out["response_ids"] == pairs["chosen_ids"]
    assert all(ids[-1] == tok.eos_token_id for ids in out["response_ids"])
    rows = [{"prompt_ids": p, "response_ids": r, "unsafe": False} for p, r in zip(out["prompt_ids"], out["response_ids"])]
    batch = collate_examples(rows, tok.pad_token_id)
    for i, (p, r) in enumerate(zip(out["prompt_ids"], out["response_ids"])):
        assert batch["loss_mask"][i].tolist() == [0] * len(p) + [1] * len(r) + [0] * (batch["loss_mask"].shape[1] - len(p) - len(r))
        assert batch["input_ids"][i, :len(p) + len(r)].tolist() == p + r
    # The loss depends on response tokens only: its gradient at every logit that predicts a
    # prompt token (or padding) is exactly 0.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach().requires_grad_()

    class Fixed(torch.nn.Module):
        def forward(self, **_):
            return type("Out", (), {"logits": logits})

    nll, tokens = response_nll(Fixed(), batch)
    assert tokens.tolist() == [len(r) for r in out["response_ids"]]
    nll.sum().backward()
    for i, p in enumerate(out["prompt_ids"]):
        # position t predicts token t+1: positions 0..len(p)−2 predict prompt tokens
        assert logits.grad[i, : len(p) - 1].abs().max() == 0
        assert logits.grad[i, len(p) - 1 : len(p) - 1 + tokens[i].int()].abs().sum(-1).min() > 0
        assert logits.grad[i, len(p) - 1 + tokens[i].int():].abs().max() == 0


def test_response_loss_falls_on_a_tiny_model(tiny):
    model, tok = tiny
    model = type(model)(model.config)
    model.load_state_dict(tiny[0].state_dict())
    out = tokenize_examples(dict(EXAMPLES), tok, max_length=64, max_prompt_length=32)
    rows = [{"prompt_ids": p, "response_ids": r} for p, r in zip(out["prompt_ids"], out["response_ids"])]
    batch = collate_examples(rows, tok.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        nll, tokens = response_nll(model, batch)
        loss = nll.sum() / tokens.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_cli_verb_and_summary():
    from safedpo_ray.cli.main import build_parser
    from safedpo_ray.train.sft import format_sft_summary

    args = build_parser().parse_args(["sft", "--config", "x.yaml", "sft.responses=all_safe", "train.epochs=1"])
    assert args.fn.__name__ == "cmd_sft" and args.overrides == ["sft.responses=all_safe", "train.epochs=1"]
    stats = {"schema": "pku", "selection": "all_safe", "rows_read": 10, "rows_quarantined": 1, "examples": 12,
             "by_category": {"safe_safe": {"safe": 12}}, "truncated": {"prompt": 0, "response": 2}}
    text = format_sft_summary({"run_dir": "/r/x", "data": {"train": stats}, "wall_time_s": 3.0, "model_dir": "/r/x/model",
                               "eval_before": {"loss": 6.9, "loss/unsafe": 7.0},
                               "eval_after": {"loss": 5.1, "loss/unsafe": 6.2}})
    assert "12 examples (all_safe)" in text and "6.900" in text and "5.100" in text and "model.name_or_path" in text


def test_relative_model_dir_reaches_workers_as_absolute(tmp_path, monkeypatch):
    """The chain configs name the SFT model relatively (runs/<sft run>/model); Ray workers start
    in another directory, so the driver hands them an absolute path."""
    from safedpo_ray.train.trainer import resolve_model

    (tmp_path / "runs" / "sft" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model.name_or_path=runs/sft/model"])
    assert resolve_model(cfg, tmp_path / "run", []) == str(tmp_path / "runs" / "sft" / "model")
    hub = load_config(None, ["model.name_or_path=PKU-Alignment/alpaca-7b-reproduced"])
    assert resolve_model(hub, tmp_path / "run", []) == "PKU-Alignment/alpaca-7b-reproduced"
