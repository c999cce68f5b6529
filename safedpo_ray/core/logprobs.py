"""Sequence log-probabilities from logits: shift, mask, sum. Pure tensor code."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token_t | tokens_<t) over the masked tokens of each sequence.

    ``logits`` [N, L, V] are the model outputs for ``input_ids`` [N, L]; ``loss_mask`` [N, L] is 1
    on the tokens whose probability counts (the response) and 0 on prompt and padding. Position t
    of the logits predicts token t+1, so logits are shifted left against the labels.
    Returns ``(logps, num_tokens)``, each [N]; logps in float32 whatever the logits' dtype.
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}"
        )
    logits = logits[:, :-1, :].float()
    labels = input_ids[:, 1:]
    mask = loss_mask[:, 1:].to(logits.dtype)
    # log p = logit[label] − logsumexp(logits): avoids materialising a second [N, L, V] tensor
    # the way log_softmax(...).gather(...) would, which matters for 50k–150k vocabularies.
    label_logits = torch.gather(logits, 2, labels.unsqueeze(-1)).squeeze(-1)
    token_logps = label_logits - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def token_logps_from_logits(logits: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) from the logits at positions[i]: ``logits`` [P, V] (positions flattened),
    ``positions``/``targets`` [T]; a position may appear more than once. Returns [T] float32."""
    picked = logits[positions].float()
    return picked.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(picked, dim=-1)


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(hidden · Wᵀ + b)[target] for T tokens, `chunk` tokens at a time: the [T, V]
    logits never exist at once, in the forward or the backward (which recomputes each chunk's
    logits: one more [chunk, H]×[H, V] product per chunk, instead of keeping [T, V] floats)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s:s + chunk], weight, bias).float()
            out[s:s + chunk] = logits.gather(1, targets[s:s + chunk, None]).squeeze(1) - logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, t, g = hidden[s:s + ctx.chunk], targets[s:s + ctx.chunk], grad_out[s:s + ctx.chunk].float()
            # d log p(t) / d logits = onehot(t) − softmax(logits), times the upstream gradient
            d = F.linear(h, weight, bias).float().softmax(-1).mul_(-g[:, None])
            d.scatter_add_(1, t[:, None], g[:, None])
            d = d.to(weight.dtype)
            if need_h:
                grad_h[s:s + ctx.chunk] = d @ weight
            if need_w:
                grad_w += (d.t() @ h).float()
            if need_b:
                grad_b += d.float().sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """log p(targets) under the output layer (``weight`` [V, H], ``bias`` [V] or None) applied to
    ``hidden`` [T, H], computed ``chunk`` tokens at a time: the same values and gradients (to
    rounding) as ``log_softmax(hidden @ weight.T + bias).gather(targets)``, in O(chunk·V) memory
    instead of O(T·V). Returns [T] float32."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * weight.sum()
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk)


def per_sequence_sums(token_logps: torch.Tensor, seq_index: torch.Tensor, num_sequences: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum flat per-token log-probs [T] into their sequences (``seq_index`` [T] in
    0..num_sequences−1): ``(logps, num_tokens)``, each [num_sequences] float32."""
    logps = token_logps.new_zeros(num_sequences).index_add(0, seq_index, token_logps)
    counts = torch.bincount(seq_index, minlength=num_sequences).to(torch.float32)
    return logps, counts
