"""Prompt formatting, pair tokenization and collation for SafeDPO (pure functions, no Ray; torch only
for collation, so data tasks that tokenize do not import it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import torch

PKU_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"

_ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
_FLAG_COLUMNS = ("chosen_unsafe", "rejected_unsafe")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str) -> str:
    """Chat template (with generation prompt) when the tokenizer has one, else the PKU template."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PKU_TEMPLATE.format(prompt=prompt)


def _as_list(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") and not isinstance(values, list) else list(values)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    if hasattr(tokenizer, "encode_texts"):  # data/task_tokenizer.py: the Rust backend alone
        return tokenizer.encode_texts(texts)
    return [list(map(int, ids)) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def tokenize_pairs(
    batch: Mapping[str, Sequence],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
) -> dict[str, list]:
    """Tokenize a columnar batch of (prompt, chosen, rejected) into prompt/response ids.

    All input columns are passed through. The prompt is tokenized once and shared by both
    responses; each response gets EOS appended. A prompt over `max_prompt_length` keeps its last
    tokens; responses are cut on the right so that prompt + response <= `max_length`.
    """
    if max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})"
        )
    if max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    for col in ("prompt", "chosen", "rejected"):
        if col not in batch:
            raise KeyError(f"tokenize_pairs needs a {col!r} column; got {sorted(batch)}")

    out: dict[str, list] = {key: _as_list(values) for key, values in batch.items()}
    prompts = [str(p) for p in out["prompt"]]
    n = len(prompts)
    if len(out["chosen"]) != n or len(out["rejected"]) != n:
        raise ValueError("prompt, chosen and rejected columns must have equal lengths")

    chat = has_chat_template(tokenizer)
    prompt_ids = _encode(tokenizer, [format_prompt(tokenizer, p) for p in prompts])
    bos = getattr(tokenizer, "bos_token_id", None)
    if not chat and bos is not None:
        prompt_ids = [ids if ids[:1] == [bos] else [bos] + ids for ids in prompt_ids]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id")
    chosen_ids = [ids + [eos] for ids in _encode(tokenizer, [str(c) for c in out["chosen"]])]
    rejected_ids = [ids + [eos] for ids in _encode(tokenizer, [str(r) for r in out["rejected"]])]

    res: dict[str, list[Any]] = {k: [] for k in (*_ID_COLUMNS, "prompt_truncated",
                                                 "chosen_truncated", "rejected_truncated")}
    for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids):
        p_trunc = len(p) > max_prompt_length
        if p_trunc:
            p = p[-max_prompt_length:]
        budget = max_length - len(p)
        res["prompt_ids"].append(p)
        res["chosen_ids"].append(c[:budget])
        res["rejected_ids"].append(r[:budget])
        res["prompt_truncated"].append(p_trunc)
        res["chosen_truncated"].append(len(c) > budget)
        res["rejected_truncated"].append(len(r) > budget)
    out.update(res)
    return out


def _ids(values: Any) -> list[int]:
    return [int(v) for v in _as_list(values)]


def _rows_to_columns(rows: list[Mapping[str, Any]] | Mapping[str, Sequence]) -> dict[str, list]:
    if isinstance(rows, Mapping):
        return {k: _as_list(v) for k, v in rows.items()}
    rows = list(rows)
    keys = [k for k in (*_ID_COLUMNS, *_FLAG_COLUMNS) if rows and k in rows[0]]
    return {k: [row[k] for row in rows] for k in keys}


def collate_pairs(
    rows: list[Mapping[str, Any]] | Mapping[str, Sequence],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
    layout: str = "padded",
    row_capacity: int | None = None,
) -> dict[str, "torch.Tensor"]:
    """A micro-batch of B pairs as model input: sequences 0..B-1 are prompt+chosen, B..2B-1
    prompt+rejected, laid out `padded`, `packed` or `shared` (data/packing.py).

    Every layout gives `input_ids` and the response tokens to score (`target_pos`, `target_ids`,
    `seq_index`), `num_sequences` and `num_tokens`; padded adds `attention_mask` and `loss_mask`
    ([2B, L], 1 exactly on response tokens), packed `position_ids`, shared `position_ids` and
    `attention_mask_4d`. Plus `chosen_unsafe`/`rejected_unsafe` float [B] tensors when those
    columns exist. Accepts row dicts or a columnar dict (lists/numpy arrays).
    """
    import torch

    from safedpo_ray.data.packing import layout_pairs  # lazy: imports torch

    cols = _rows_to_columns(rows)
    for col in _ID_COLUMNS:
        if col not in cols:
            raise KeyError(f"collate_pairs needs a {col!r} column; got {sorted(cols)}")
    prompts = [_ids(p) for p in cols["prompt_ids"]]
    chosen, rejected = [_ids(c) for c in cols["chosen_ids"]], [_ids(r) for r in cols["rejected_ids"]]
    if not prompts or not len(prompts) == len(chosen) == len(rejected):
        raise ValueError("collate_pairs needs a non-empty batch with equal-length id columns")
    out = layout_pairs(prompts, chosen, rejected, pad_token_id, layout, pad_to_multiple_of, row_capacity)
    for col in _FLAG_COLUMNS:
        if col in cols:
            out[col] = torch.tensor([float(v) for v in _as_list(cols[col])], dtype=torch.float32)
    return out
