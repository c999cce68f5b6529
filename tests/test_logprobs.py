"""Log-prob extraction on exact tensors."""

import math

import pytest
import torch

from safedpo_ray.core.logprobs import sequence_logps


def test_exact_shift_mask_sum():
    """Vocabulary of 2. Logits are chosen so every log-prob is exact by hand.

    At each position the logits are [0, 0] (p = 1/2 each) or [0, log 3] (p = 1/4, 3/4).
    Sequence 0: tokens [1, 0, 1], mask [0, 1, 1] (first token is prompt).
      position 0 predicts token 0 with logits [0, log 3]: log(1/4)
      position 1 predicts token 1 with logits [0, 0]:     log(1/2)
      sum = log(1/4) + log(1/2) = log(1/8); 2 tokens.
    Sequence 1: tokens [0, 1, 0], mask [0, 1, 0] (last position is padding).
      position 0 predicts token 1 with logits [0, 0]: log(1/2); 1 token.
    The logits at the last position never count (nothing follows them).
    """
    l3 = math.log(3.0)
    logits = torch.tensor(
        [[[0.0, l3], [0.0, 0.0], [9.0, -9.0]], [[0.0, 0.0], [0.0, l3], [5.0, 5.0]]]
    )
    input_ids = torch.tensor([[1, 0, 1], [0, 1, 0]])
    loss_mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    logps, n = sequence_logps(logits, input_ids, loss_mask)
    assert logps.tolist() == pytest.approx([math.log(1 / 8), math.log(1 / 2)], abs=1e-6)
    assert n.tolist() == [2.0, 1.0]


def test_matches_cross_entropy_and_bf16_returns_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[:, :2] = 0
    logps, _ = sequence_logps(logits, ids, mask)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none"
    ).view(3, 6)
    assert torch.allclose(logps, -(ce * mask[:, 1:]).sum(-1), atol=1e-5)
    bf16, _ = sequence_logps(logits.bfloat16(), ids, mask)
    assert bf16.dtype == torch.float32


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        sequence_logps(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4))
