"""Lay a micro-batch's sequences out as model rows: padded one per row, or packed.

A micro-batch of B pairs is 2B sequences (prompt + chosen for 0..B−1, prompt + rejected for
B..2B−1). Either layout gives the model `input_ids` [R, C] and says, for every position t whose
next token is a response token, which token that is (`target_ids`, `target_mask`) and which
sequence it belongs to (`seq_index`), so that per-sequence log-probs are one scatter-add away
whatever the layout (algorithm.sequence_logps_and_lengths).

- padded: R = 2B rows of the longest sequence's length, right-padded, with `attention_mask`.
- packed: the sequences are placed first-fit-decreasing into rows no longer than the longest
  sequence (so no row attends over more than a padded row would), each sequence's
  `position_ids` restarting at 0; no `attention_mask`: the model's mask builder reads the
  restarts in `position_ids` as sequence boundaries (block-diagonal causal attention; varlen
  kernels under flash-attention). Padding then only fills the tail of the last rows.

Pure tensor code.
"""

from __future__ import annotations

import torch


def _targets(sequences: list[list[int]], response_starts: list[int]):
    """Per sequence: (ids, first target position, end): position t of a sequence targets token t+1,
    which is a response token for t in [start − 1, len − 1)."""
    return [(ids, max(start - 1, 0), len(ids) - 1) for ids, start in zip(sequences, response_starts)]


def padded_layout(sequences: list[list[int]], response_starts: list[int], pad_id: int,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    n = len(sequences)
    length = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((n, length), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    loss_mask = torch.zeros((n, length), dtype=torch.long)
    target_ids = torch.zeros((n, length), dtype=torch.long)
    target_mask = torch.zeros((n, length), dtype=torch.bool)
    for i, (ids, first, end) in enumerate(_targets(sequences, response_starts)):
        row = torch.tensor(ids, dtype=torch.long)
        input_ids[i, :len(ids)] = row
        attention_mask[i, :len(ids)] = 1
        loss_mask[i, response_starts[i]:len(ids)] = 1
        target_ids[i, first:end] = row[first + 1:end + 1]
        target_mask[i, first:end] = True
    seq_index = torch.arange(n).unsqueeze(1).expand(n, length).contiguous()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "target_ids": target_ids, "target_mask": target_mask, "seq_index": seq_index,
            "num_sequences": torch.tensor(n), "num_tokens": attention_mask.sum()}


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row, each row's lengths summing to ≤ capacity
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


def packed_layout(sequences: list[list[int]], response_starts: list[int], pad_id: int,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    n = len(sequences)
    lengths = [len(s) for s in sequences]
    capacity = max(lengths)
    rows = pack_rows(lengths, capacity)
    length = max(sum(lengths[i] for i in row) for row in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(rows), length)
    input_ids = torch.full(shape, int(pad_id), dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    target_ids = torch.zeros(shape, dtype=torch.long)
    target_mask = torch.zeros(shape, dtype=torch.bool)
    seq_index = torch.zeros(shape, dtype=torch.long)
    spans = _targets(sequences, response_starts)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids, first, end = spans[i]
            t = torch.tensor(ids, dtype=torch.long)
            input_ids[r, at:at + len(ids)] = t
            position_ids[r, at:at + len(ids)] = torch.arange(len(ids))
            target_ids[r, at + first:at + end] = t[first + 1:end + 1]
            target_mask[r, at + first:at + end] = True
            seq_index[r, at:at + len(ids)] = i
            at += len(ids)
        # The tail's positions count up from 0 too: a block of its own, attending to nothing real.
        position_ids[r, at:] = torch.arange(length - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "target_ids": target_ids,
            "target_mask": target_mask, "seq_index": seq_index,
            "num_sequences": torch.tensor(n), "num_tokens": torch.tensor(sum(lengths))}
