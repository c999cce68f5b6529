"""Supervised fine-tuning examples: the safe responses of preference data, or prompt/response rows.

Pure pieces (no Ray): `sft_examples` (which responses of a PKU-form row to train on),
`held_out_examples`, `validate_plain_rows`, `tokenize_examples`, `collate_examples`.
`examples_dataset` maps them over rows with Ray Data and materializes the result, as
data/pipeline.py does for preference pairs.

Which responses (`sft.responses`):
  helpful_safe   the helpful winner (better_response_id) of each pair, when it is safe
  all_safe       every safe response of each pair (0, 1 or 2 per pair)
Unsafe responses are never trained on. Held-out examples are every response of the held-out
pairs, safe ones (`eval/loss`) and unsafe ones (`eval/loss/unsafe`, never trained on), whatever
`sft.responses` says, so runs with either setting report the same numbers. A plain file (columns
`prompt`, `response`; extra columns ignored) trains on every row.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from safedpo_ray.config.choices import SFT_RESPONSES
from safedpo_ray.data.pipeline import DataError, ValidatedRows
from safedpo_ray.data.schema import SchemaError, _is_missing, detect_schema
from safedpo_ray.data.tokenize import tokenize_pairs
from safedpo_ray.data.transform import pair_category

if TYPE_CHECKING:
    import pandas as pd
    import torch
# pandas and torch are imported where they are used: the `sft` verb is registered by every
# command's argument parser (safedpo_ray/cli/main.py), which should not pay for them.

RESPONSES = SFT_RESPONSES
PLAIN_FIELDS = ("prompt", "response")
PLAIN = "prompt_response"
SFT_COLUMNS = ["example_id", "prompt_ids", "response_ids", "unsafe"]


def sft_schema(columns: Iterable[str], schema: str = "auto") -> str:
    """'pku' / 'pairwise' (preference rows: pick safe responses) or 'prompt_response' (plain)."""
    cols = set(columns)
    if schema != "auto":
        return schema
    try:
        return detect_schema(cols)
    except SchemaError as exc:
        if set(PLAIN_FIELDS) <= cols:
            return PLAIN
        raise SchemaError(f"{exc}; or, for SFT, columns 'prompt' and 'response'") from None


def sft_examples(row: Mapping[str, Any], responses: str = "helpful_safe") -> list[dict[str, Any]]:
    """The training examples of one PKU-form row: [{prompt, response, response_index, unsafe}]."""
    if responses not in RESPONSES:
        raise ValueError(f"unknown sft.responses {responses!r}; one of {', '.join(RESPONSES)}")
    safe = (bool(row["is_response_0_safe"]), bool(row["is_response_1_safe"]))
    better = int(row["better_response_id"])
    picked = ([better] if safe[better] else []) if responses == "helpful_safe" else [i for i in (0, 1) if safe[i]]
    return [{"prompt": row["prompt"], "response": row[f"response_{i}"], "response_index": i, "unsafe": False}
            for i in picked]


def held_out_examples(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Both responses of a held-out PKU-form row, each with its safety label."""
    return [{"prompt": row["prompt"], "response": row[f"response_{i}"], "response_index": i,
             "unsafe": not bool(row[f"is_response_{i}_safe"])} for i in (0, 1)]


def validate_plain_rows(rows: list[dict[str, Any]], *, strict: bool = False, split: str = "train") -> ValidatedRows:
    """Prompt/response rows with non-empty strings; others quarantined with their reasons."""
    out = ValidatedRows(rows=[], rows_read=len(rows))
    for row in rows:
        number = row.get("row_number")
        reasons = [row["__invalid__"]] if "__invalid__" in row else []
        for field in () if reasons else PLAIN_FIELDS:
            value = row.get(field)
            if field not in row or _is_missing(value):
                reasons.append(f"missing field '{field}'")
            elif not isinstance(value, str):
                reasons.append(f"field '{field}' must be a string, got {type(value).__name__}")
            elif not value.strip():
                reasons.append(f"field '{field}' is empty")
        if reasons:
            if strict:
                raise DataError(f"{split} data, row {number}: {'; '.join(reasons)}")
            out.quarantined.append({"split": split, "row_number": number, "reasons": reasons, "row": row})
            continue
        out.rows.append({"prompt": row["prompt"], "response": row["response"], "pair_id": number})
    return out


def _select_batch(batch: pd.DataFrame, kind: str, responses: str, held_out: bool) -> pd.DataFrame:
    import pandas as pd

    records = []
    for row in batch.to_dict("records"):
        if kind == PLAIN:
            found = [{"prompt": row["prompt"], "response": row["response"], "response_index": 0, "unsafe": False}]
            category = PLAIN
        else:
            found = held_out_examples(row) if held_out else sft_examples(row, responses)
            category = pair_category(row)
        for ex in found:
            # Two responses per row at most: a stable id that orders examples like their rows.
            records.append({"example_id": 2 * int(row["pair_id"]) + ex["response_index"], "category": category,
                            "prompt": ex["prompt"], "response": ex["response"], "unsafe": bool(ex["unsafe"])})
    columns = ["example_id", "category", "prompt", "response", "unsafe"]
    return pd.DataFrame.from_records(records, columns=columns)


def tokenize_examples(batch: Mapping[str, Sequence], tokenizer, *, max_length: int,
                      max_prompt_length: int) -> dict[str, list]:
    """prompt_ids / response_ids exactly as preference training tokenizes a chosen response (same
    template, BOS, EOS and truncation: tokenize_pairs with an empty stand-in for `rejected`), so a
    model fine-tuned here sees the format the DPO stage will train it on."""

    columns = {k: list(v) for k, v in batch.items()}
    columns["chosen"], columns["rejected"] = columns.pop("response"), [""] * len(columns["prompt"])
    out = tokenize_pairs(columns, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    out["response"], out["response_ids"] = out.pop("chosen"), out.pop("chosen_ids")
    out["response_truncated"] = out.pop("chosen_truncated")
    for key in ("rejected", "rejected_ids", "rejected_truncated"):
        out.pop(key)
    return out


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, trust_remote_code: bool):
    from safedpo_ray.models.loading import load_tokenizer  # lazy: imports torch

    return load_tokenizer(path, trust_remote_code=trust_remote_code)


def _tokenize_batch(batch: pd.DataFrame, tokenizer_path: str, trust_remote_code: bool,
                    max_length: int, max_prompt_length: int) -> pd.DataFrame:
    import pandas as pd

    out = tokenize_examples({c: batch[c].tolist() for c in batch.columns}, _cached_tokenizer(tokenizer_path, trust_remote_code),
                            max_length=max_length, max_prompt_length=max_prompt_length)
    for k in ("prompt_truncated", "response_truncated"):
        out[k] = [int(v) for v in out[k]]
    return pd.DataFrame(out)


def examples_dataset(rows: list[dict[str, Any]], *, kind: str, responses: str, held_out: bool,
                     tokenizer_path: str, cfg, trust_remote_code: bool = False):
    """Ray Data graph: select responses → tokenize, materialized. Returns (dataset, statistics).
    `rows` are validated (PKU form with pair_id, or prompt/response with pair_id); `cfg` a DataConfig."""
    import ray.data

    if not rows:
        raise DataError("no valid rows for SFT (all rows were quarantined?)")
    blocks = max(1, min(256, -(-len(rows) // cfg.tokenize_batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(_select_batch, batch_format="pandas", batch_size=cfg.tokenize_batch_size,
                        fn_kwargs={"kind": kind, "responses": responses, "held_out": held_out}).materialize()
    n = ds.count()
    if n == 0:
        raise DataError(f"sft.responses={responses} selected no response (no safe responses in the data?)")
    counts = ds.select_columns(["category", "unsafe"]).to_pandas().value_counts()
    stats: dict[str, Any] = {"examples": n, "rows": len(rows), "by_category": {}}
    for (category, unsafe), count in counts.items():
        stats["by_category"].setdefault(category, {})["unsafe" if unsafe else "safe"] = int(count)
    tokenized = ds.map_batches(
        _tokenize_batch, batch_format="pandas", batch_size=cfg.tokenize_batch_size,
        fn_kwargs={"tokenizer_path": tokenizer_path, "trust_remote_code": trust_remote_code,
                   "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length},
    ).materialize()
    sums = tokenized.select_columns(["prompt_truncated", "response_truncated"]).to_pandas().sum()
    stats["truncated"] = {k.replace("_truncated", ""): int(v) for k, v in sums.items()}
    return tokenized, stats


def collate_examples(rows: list[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """[B, L] right-padded prompt+response: `input_ids`, `attention_mask`, `loss_mask` (1 exactly
    on response tokens: the loss never sees the prompt) and `unsafe` float [B] when present."""
    import torch

    if not rows:
        raise ValueError("collate_examples needs a non-empty batch")
    seqs = [([int(t) for t in r["prompt_ids"]], [int(t) for t in r["response_ids"]]) for r in rows]
    length = max(len(p) + len(q) for p, q in seqs)
    input_ids = torch.full((len(rows), length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (p, q) in enumerate(seqs):
        n = len(p) + len(q)
        input_ids[i, :n] = torch.tensor(p + q, dtype=torch.long)
        attention_mask[i, :n] = 1
        loss_mask[i, len(p):n] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    if "unsafe" in rows[0]:
        out["unsafe"] = torch.tensor([float(bool(r["unsafe"])) for r in rows], dtype=torch.float32)
    return out


def format_sft_stats(stats: dict[str, Any]) -> str:
    lines = []
    for split, s in stats.items():
        lines.append(f"{split}: {s['rows_read']} rows read, {s['rows_quarantined']} quarantined, "
                     f"{s['examples']} examples ({s['selection']})")
        for category, counts in sorted(s["by_category"].items()):
            lines.append(f"  {category:<16} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        t = s["truncated"]
        lines.append(f"  truncated: prompt {t['prompt']}, response {t['response']}")
    return "\n".join(lines)
