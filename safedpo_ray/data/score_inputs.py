"""What a score model reads: safe-rlhf's conversation text, the token ids, padded batches, the dtype.

Shared by scoring (`evaluate/scorers.py`) and scorer training (`train/scorer.py`).
"""

from __future__ import annotations

import torch

from safedpo_ray.data.tokenize import PKU_TEMPLATE
from safedpo_ray.models.loading import resolve_dtype


def score_text(prompt: str, response: str) -> str:
    """safe-rlhf's conversation text (no space after 'ASSISTANT:'); EOS is appended as a token."""
    return PKU_TEMPLATE.format(prompt=prompt) + response


def encode_for_score(tokenizer, prompts: list[str], responses: list[str], max_length: int, *,
                     template: str = "pku", truncated: list[bool] | None = None) -> list[list[int]]:
    """Token ids to score. 'pku': BOS + safe-rlhf conversation + EOS (no EOS for a truncated
    response); longer inputs keep their start and a finished one still ends on EOS. 'chat': the
    tokenizer's chat template with both turns (a truncated assistant turn is left open)."""
    truncated = list(truncated) if truncated is not None else [False] * len(prompts)
    if template == "chat":
        out = []
        for p, r, cut in zip(prompts, responses, truncated):
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                                 tokenize=False, continue_final_message=bool(cut))
            out.append(list(map(int, tokenizer(text, add_special_tokens=False)["input_ids"]))[:max_length])
        return out
    ids = [list(map(int, x)) for x in tokenizer([score_text(p, r) for p, r in zip(prompts, responses)],
                                                add_special_tokens=True)["input_ids"]]
    bos, eos = getattr(tokenizer, "bos_token_id", None), tokenizer.eos_token_id
    out = []
    for x, cut in zip(ids, truncated):
        if bos is not None and x[:1] != [bos]:
            x = [bos] + x
        if cut:
            while x[-1:] == [eos]:  # a tokenizer that appends EOS itself
                x = x[:-1]
            out.append(x[:max_length])
            continue
        if x[-1:] != [eos]:
            x = x + [eos]
        out.append(x if len(x) <= max_length else x[: max_length - 1] + [eos])
    return out


def pad_right(ids: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids.to(device), mask.to(device)


def scoring_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """'auto' → bfloat16 on a GPU, float32 on a CPU; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return resolve_dtype(name)
