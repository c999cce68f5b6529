"""Lay a micro-batch's pairs out as model rows: padded, packed, or packed with a shared prompt.

A micro-batch of B pairs is 2B sequences (prompt + chosen for 0..B−1, prompt + rejected for
B..2B−1). Every layout gives the model `input_ids` [R, C] and lists the response tokens to score
as flat [T] tensors: `target_pos` (the flat position in R×C whose output predicts the token),
`target_ids` (the token) and `seq_index` (its sequence), so that per-sequence log-probs are one
scatter-add away whatever the layout (algorithm.sequence_logps_and_lengths).

- padded: one sequence per row, right-padded to the longest, with a 2D `attention_mask`.
- packed: sequences placed first-fit-decreasing into rows no longer than the longest sequence,
  `position_ids` restarting at 0 per sequence and no attention mask: the model's mask builder
  reads the restarts as sequence boundaries (block-diagonal causal attention; varlen kernels
  under flash-attention). Padding only fills the tail of the last rows.
- shared: each pair is one segment [prompt, chosen, rejected], the prompt run once (prefix
  sharing, arXiv 2410.20305): the rejected tokens take positions p.. again and attend to the
  prompt and to themselves, never to the chosen ones; the last prompt position predicts both
  first response tokens. Segments are packed like sequences; the attention is a 4D boolean
  mask `attention_mask_4d` [R, 1, C, C] (True = may attend), which algorithm.model_inputs hands
  over in the form the model's attention implementation takes.

Pure tensor code.
"""

from __future__ import annotations

import torch

LAYOUTS = ("padded", "packed", "shared")


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: item indices per row, each row's lengths summing to ≤ capacity
    (ties broken by index, so the layout is a function of the lengths alone)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def _round_up(length: int, multiple: int | None) -> int:
    return -(-length // multiple) * multiple if multiple else length


class _Targets:
    def __init__(self) -> None:
        self.pos: list[int] = []
        self.ids: list[int] = []
        self.seq: list[int] = []

    def add(self, row_start: int, positions, ids: list[int], seq: int) -> None:
        """Positions (relative to row_start) predicting `ids`, one each."""
        self.pos += [row_start + p for p in positions]
        self.ids += ids
        self.seq += [seq] * len(ids)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"target_pos": torch.tensor(self.pos, dtype=torch.long),
                "target_ids": torch.tensor(self.ids, dtype=torch.long),
                "seq_index": torch.tensor(self.seq, dtype=torch.long)}


def layout_pairs(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], pad_id: int,
                 layout: str = "padded", pad_to_multiple_of: int | None = None,
                 row_capacity: int | None = None) -> dict[str, torch.Tensor]:
    """`row_capacity`: the longest a packed row may be (default: the longest sequence or segment,
    so that no row attends over more than a padded row would)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown batch layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if layout == "shared":
        return _shared(prompts, chosen, rejected, pad_id, pad_to_multiple_of, row_capacity)
    n = len(prompts)
    sequences = [(p, r, i) for i, (p, r) in enumerate(zip(prompts + prompts, chosen + rejected))]
    lengths = [len(p) + len(r) for p, r, _ in sequences]
    if layout == "padded":
        rows = [[i] for i in range(len(sequences))]
    else:
        rows = pack_rows(lengths, max(max(lengths), row_capacity or 0))
    width = _round_up(max(sum(lengths[i] for i in row) for row in rows), pad_to_multiple_of)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = _Targets()
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            p, resp, seq = sequences[i]
            ids = p + resp
            input_ids[r, at:at + len(ids)] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, at:at + len(ids)] = torch.arange(len(ids))
            attention_mask[r, at:at + len(ids)] = 1
            # position t predicts token t+1: the response tokens from the last prompt position on
            targets.add(r * width + at, range(len(p) - 1, len(ids) - 1), resp, seq)
            at += len(ids)
        position_ids[r, at:] = torch.arange(width - at)  # the tail: a block of its own
    out = {"input_ids": input_ids, **targets.tensors(),
           "num_sequences": torch.tensor(2 * n), "num_tokens": torch.tensor(sum(lengths))}
    if layout == "padded":
        out["attention_mask"] = attention_mask
        out["loss_mask"] = _loss_mask(attention_mask, [len(p) for p, _, _ in sequences])
    else:
        out["position_ids"] = position_ids
    return out


def _loss_mask(attention_mask: torch.Tensor, prompt_lengths: list[int]) -> torch.Tensor:
    """1 exactly on the response tokens of a padded layout (the tokens scored)."""
    loss_mask = attention_mask.clone()
    for i, p in enumerate(prompt_lengths):
        loss_mask[i, :p] = 0
    return loss_mask


def _shared(prompts, chosen, rejected, pad_id, pad_to_multiple_of, row_capacity):
    n = len(prompts)
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
    rows = pack_rows(lengths, max(max(lengths), row_capacity or 0))
    width = _round_up(max(sum(lengths[i] for i in row) for row in rows), pad_to_multiple_of)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    targets = _Targets()
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            p, c, rj = prompts[i], chosen[i], rejected[i]
            np_, nc, nr = len(p), len(c), len(rj)
            end = at + np_ + nc + nr
            input_ids[r, at:end] = torch.tensor(p + c + rj, dtype=torch.long)
            position_ids[r, at:end] = torch.cat([torch.arange(np_ + nc), torch.arange(np_, np_ + nr)])
            mask[r, 0, at:end, at:end] = causal[:end - at, :end - at]
            mask[r, 0, at + np_ + nc:end, at + np_:at + np_ + nc] = False  # rejected never sees chosen
            base = r * width + at
            targets.add(base, range(np_ - 1, np_ + nc - 1), c, i)
            # the rejected response: its first token from the last prompt position, then its own
            targets.add(base, [np_ - 1] + list(range(np_ + nc, np_ + nc + nr - 1)), rj, n + i)
            at = end
        tail = torch.arange(at, width)
        mask[r, 0, tail, tail] = True  # padding attends to itself only (no empty softmax rows)
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask_4d": mask, **targets.tensors(),
            "num_sequences": torch.tensor(2 * n),
            "num_tokens": torch.tensor(sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)))}


def probe_pairs(columns: dict, pairs: int = 2, prompt_tokens: int = 24, response_tokens: int = 12) -> dict:
    """A few pairs of a batch cut short (the prompt's last tokens, the responses' first): enough
    to tell whether a model keeps packed or shared rows' sequences apart, at a small fraction of
    a micro-batch's forward (lay them out with a `row_capacity` that puts them in one row)."""
    out = {k: list(v[:pairs]) for k, v in columns.items()}
    out["prompt_ids"] = [list(p)[-prompt_tokens:] for p in out["prompt_ids"]]
    for key in ("chosen_ids", "rejected_ids"):
        out[key] = [list(r)[:response_tokens] for r in out[key]]
    return out
