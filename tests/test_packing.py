"""Packed batches and the chunked log-prob layer give the padded, full-logits path's numbers."""

import copy
import random

import pytest
import torch
from torch import nn

from safedpo_ray.core import logp_head
from safedpo_ray.core.algorithm import LAYOUT_TOLERANCE, concatenated_logps_and_lengths, layout_gap, safedpo_forward, usable_layout
from safedpo_ray.data.packing import pack_rows
from safedpo_ray.data.tokenize import collate_pairs
from safedpo_ray.core.logprobs import chunked_token_logps, sequence_logps


# ------------------------------------------------------------------------------ layouts by hand
def test_pack_rows_first_fit_decreasing():
    # capacity 5: 5 alone; 4 then 1; 3 then 2; the second 2 opens a row
    assert pack_rows([2, 5, 3, 4, 1, 2], 5) == [[1], [3, 4], [2, 0], [5]]
    rows = pack_rows([3, 3, 3], 3)
    assert rows == [[0], [1], [2]]


def test_packed_layout_by_hand():
    # pair 0: prompt [7], chosen [1, 2], rejected [3]; pair 1: prompt [8, 9], chosen [4], rejected [5, 6]
    # sequences (len): 0 = 7 1 2 (3), 1 = 8 9 4 (3), 2 = 7 3 (2), 3 = 8 9 5 6 (4); capacity 4
    # first-fit decreasing: [3], [0], [1], then 2 (len 2) fits nowhere (rooms 0, 1, 1): [2]
    b = collate_pairs({"prompt_ids": [[7], [8, 9]], "chosen_ids": [[1, 2], [4]], "rejected_ids": [[3], [5, 6]]},
                      0, layout="packed")
    assert b["input_ids"].tolist() == [[8, 9, 5, 6], [7, 1, 2, 0], [8, 9, 4, 0], [7, 3, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 0], [0, 1, 0, 1]]
    # position t targets token t+1 where that is a response token
    # position t predicts token t+1 where that is a response token; flat positions in the 4×4 rows
    assert b["target_pos"].tolist() == [1, 2, 4, 5, 9, 12]
    assert b["target_ids"].tolist() == [5, 6, 1, 2, 4, 3]
    assert b["seq_index"].tolist() == [3, 3, 0, 0, 1, 2]
    assert int(b["num_sequences"]) == 4 and int(b["num_tokens"]) == 12


def test_shared_layout_by_hand():
    # pair 0: prompt [7, 8], chosen [1, 2], rejected [3]; pair 1: prompt [9], chosen [4], rejected [5, 6]
    # segments: 7 8 1 2 3 (5) and 9 4 5 6 (4); capacity 5: a row each
    b = collate_pairs({"prompt_ids": [[7, 8], [9]], "chosen_ids": [[1, 2], [4]], "rejected_ids": [[3], [5, 6]]},
                      0, layout="shared")
    assert b["input_ids"].tolist() == [[7, 8, 1, 2, 3], [9, 4, 5, 6, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    m = b["attention_mask_4d"][:, 0].int().tolist()
    assert m[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]
    assert m[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    # the last prompt position (8 at flat 1, 9 at flat 5) predicts both first response tokens
    assert b["target_pos"].tolist() == [1, 2, 1, 5, 5, 7]
    assert b["target_ids"].tolist() == [1, 2, 3, 4, 5, 6]
    assert b["seq_index"].tolist() == [0, 0, 2, 1, 3, 3]
    assert int(b["num_tokens"]) == 7 + 5  # what the padded layout would compute, without its padding


def test_rows_share_when_short():
    b = collate_pairs({"prompt_ids": [[7]], "chosen_ids": [[1, 2, 3, 4]], "rejected_ids": [[5]]}, 0, layout="packed")
    # lengths 5 and 2, capacity 5: two rows (5 is full); a third short pair would share the second
    assert b["input_ids"].shape == (2, 5)
    b = collate_pairs({"prompt_ids": [[7], [7]], "chosen_ids": [[1, 2, 3, 4], [1]], "rejected_ids": [[5], [6]]},
                      0, layout="packed")
    # sequences 7 1 2 3 4 (5) | 7 1 (2) | 7 5 (2) | 7 6 (2): the two first short ones share a row
    assert b["input_ids"].tolist() == [[7, 1, 2, 3, 4], [7, 1, 7, 5, 0], [7, 6, 0, 0, 0]]
    assert b["position_ids"][1].tolist() == [0, 1, 0, 1, 0]
    assert b["seq_index"].tolist() == [0, 0, 0, 0, 1, 2, 3]


def test_padded_layout_targets_match_loss_mask():
    b = collate_pairs({"prompt_ids": [[7], [8, 9]], "chosen_ids": [[1, 2], [4]], "rejected_ids": [[3], [5, 6]]}, 0)
    rows, cols = torch.nonzero(b["loss_mask"][:, 1:], as_tuple=True)  # position t scores token t+1
    assert b["target_pos"].tolist() == (rows * 4 + cols).tolist()
    assert b["target_ids"].tolist() == [1, 2, 4, 3, 5, 6]
    assert int(b["num_tokens"]) == int(b["attention_mask"].sum()) == 12


# ------------------------------------------------------------------------------ chunked log-probs
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_logps_equal_full_logits_with_gradients(chunk, with_bias):
    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 11, (7,), generator=g)
    upstream = torch.randn(7, generator=g, dtype=torch.float64)

    full = torch.log_softmax(nn.functional.linear(hidden, weight, bias).float(), -1)
    full = full.gather(1, targets[:, None]).squeeze(1)
    full_grads = torch.autograd.grad((full * upstream).sum(), [t for t in (hidden, weight, bias) if t is not None])
    out = chunked_token_logps(hidden, weight, targets, bias, chunk=chunk)
    grads = torch.autograd.grad((out * upstream).sum(), [t for t in (hidden, weight, bias) if t is not None])
    assert out.dtype == torch.float32
    assert torch.allclose(out, full, atol=1e-6)
    for a, b in zip(grads, full_grads):
        assert a.dtype == b.dtype and torch.allclose(a, b.to(a.dtype), atol=1e-6)


def test_chunked_logps_gradcheck():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 5, 2, 2])
    # the forward returns float32, so check the float64 gradients against finite differences loosely
    fn = lambda h, w: chunked_token_logps(h, w, targets, chunk=3).double()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-3, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------ a tiny model
def tiny_llama(vocab=97, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).float()


def random_pairs(n, vocab=97, seed=0):
    r = random.Random(seed)
    ids = lambda lo, hi: [r.randrange(3, vocab) for _ in range(r.randint(lo, hi))]  # noqa: E731
    return {"prompt_ids": [ids(2, 12) for _ in range(n)], "chosen_ids": [ids(1, 30) for _ in range(n)],
            "rejected_ids": [ids(1, 30) for _ in range(n)],
            "chosen_unsafe": [0.0] * n, "rejected_unsafe": [float(i % 2) for i in range(n)]}


def forward_and_grads(model, batch, trainable):
    model.zero_grad()
    loss, per = safedpo_forward(model, lambda b: (torch.full((4,), -40.0), torch.full((4,), -41.0)),
                                batch, beta=0.5, delta=2.0)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainable(model)])
    return per, grads


def as_lora(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make every LoRA gradient but B's vanish
            nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("layout,chunk", [("packed", 0), ("padded", 5), ("packed", 5), ("packed", 4096),
                                          ("shared", 0), ("shared", 5)])
def test_layouts_and_chunking_equal_padded_full_logits(lora, layout, chunk):
    rows = random_pairs(4)
    base = tiny_llama()
    if lora:
        base = as_lora(base)
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    ref_per, ref_grads = forward_and_grads(base, collate_pairs(rows, 0), trainable)

    model = copy.deepcopy(base)
    if chunk:
        assert logp_head.install(model, chunk) is not None
    batch = collate_pairs(rows, 0, layout=layout)
    if layout != "padded":
        assert batch["input_ids"].shape[0] < 8  # the layout really packed
    per, grads = forward_and_grads(model, batch, trainable)
    for key in ("logps/chosen", "logps/rejected", "loss"):
        assert torch.allclose(per[key], ref_per[key], atol=1e-5, rtol=1e-5), key
    assert torch.allclose(grads, ref_grads, atol=1e-5, rtol=1e-4)
    assert grads.abs().sum() > 0


def test_log_prob_layer_is_the_linear_layer_outside_a_block_and_exports_the_same_keys():
    model = tiny_llama()
    keys = list(model.state_dict())
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(input_ids=ids).logits
    head = logp_head.install(model, 3)
    assert isinstance(head, logp_head.LogpLinear) and logp_head.find(model) is head
    assert list(model.state_dict()) == keys
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert torch.equal(model(input_ids=ids).logits, before)
    copied = copy.deepcopy(model)  # a frozen reference copy keeps its own layer and targets
    assert logp_head.find(copied) is not head and isinstance(logp_head.find(copied), logp_head.LogpLinear)
    with logp_head.targets(head, torch.tensor([1, 2, 2]), torch.tensor([7, 8, 3])):  # a position twice
        out = model(input_ids=ids).logits
        assert torch.equal(copied(input_ids=ids).logits, before)  # the copy is unaffected
    expected = torch.log_softmax(before, -1)[0, [1, 2, 2], [7, 8, 3]]
    assert out.shape == (3,) and torch.allclose(out, expected, atol=1e-6)
    assert head.logp_targets is None


def test_models_that_post_process_logits_keep_full_logits():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in logp_head.unsupported_reason(model)
    assert logp_head.install(model, 8) is None and logp_head.find(model) is None


def test_layout_gap_flags_a_model_that_attends_across_sequences(monkeypatch):
    rows = random_pairs(4)
    model = tiny_llama()
    packed, padded = collate_pairs(rows, 0, layout="packed"), collate_pairs(rows, 0)
    assert layout_gap(model, packed, padded) < 1e-5
    assert layout_gap(model, collate_pairs(rows, 0, layout="shared"), padded) < 1e-5

    class CrossAttending(nn.Module):  # ignores position_ids: plain causal attention over the row
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False):
            if attention_mask is not None and attention_mask.dim() == 4:
                attention_mask = None
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    # (a random tiny model attends almost uniformly, so the leak is small here, yet 10× the tolerance)
    leaky = CrossAttending(model)
    assert layout_gap(leaky, packed, padded) > 10 * LAYOUT_TOLERANCE["fp32"]
    # the fallback: shared needs a 4D mask (this wrapper drops it too), packed leaks, padded it is
    layout, note = usable_layout(leaky, "shared", lambda layout: collate_pairs(rows, 0, layout=layout), "fp32")
    assert layout == "padded" and "packed: log-probs" in note
    assert usable_layout(model, "shared", lambda layout: collate_pairs(rows, 0, layout=layout), "fp32") == ("shared", "")
    import safedpo_ray.core.algorithm as algorithm

    monkeypatch.setattr(algorithm, "attention_implementation", lambda m: "flash_attention_2")  # no 4D masks
    layout, note = usable_layout(model, "shared", lambda layout: collate_pairs(rows, 0, layout=layout), "fp32")
    assert layout == "packed" and "shared: its attention takes no 4D mask" in note


def test_sequence_logps_of_hand_built_padded_batch_still_work():
    model = tiny_llama()
    b = collate_pairs(random_pairs(2), 0)
    hand = {k: b[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    c, r, lc, lr = concatenated_logps_and_lengths(model, hand)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    expected, n = sequence_logps(logits, b["input_ids"], b["loss_mask"])
    assert torch.allclose(torch.cat([c, r]), expected, atol=1e-6) and torch.equal(torch.cat([lc, lr]), n)


def test_probe_is_two_short_pairs_in_one_row_and_still_catches_a_leak():
    from safedpo_ray.data.packing import probe_pairs

    rows = random_pairs(4)
    probe = probe_pairs(rows, prompt_tokens=5, response_tokens=3)
    assert len(probe["prompt_ids"]) == 2 and probe["prompt_ids"][0] == rows["prompt_ids"][0][-5:]
    assert probe["chosen_ids"][1] == rows["chosen_ids"][1][:3] and probe["rejected_unsafe"] == [0.0, 1.0]
    for layout in ("packed", "shared"):
        assert collate_pairs(probe, 0, layout=layout, row_capacity=4096)["input_ids"].shape[0] == 1
    model = tiny_llama()

    class CrossAttending(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False):
            mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            return self.inner(input_ids=input_ids, attention_mask=mask, use_cache=use_cache)

    def collate(layout):
        return collate_pairs(probe_pairs(rows), 0, layout=layout, row_capacity=4096)

    assert usable_layout(model, "shared", collate, "fp32") == ("shared", "")
    assert usable_layout(CrossAttending(model), "packed", collate, "fp32")[0] == "padded"
