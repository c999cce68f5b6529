"""What both generation engines share, as pure functions: the prompt token ids, the stop tokens,
how a generated id sequence becomes a response (and whether it was truncated), and the request
the vLLM engine gets. The 'hf' engine (generate.py) and the 'vllm' engine (vllm_engine.py) call
these and nothing else, so they see the same prompts token for token.

* Prompt ids: chat template (with generation prompt) when the tokenizer has one, rendered to
  text and tokenized *without* special tokens (a template that writes BOS gets exactly one);
  else the PKU template with BOS prepended, as training formats prompts. Longer prompts keep
  their last `max_prompt_length` tokens, as in training.
* Stop tokens: the tokenizer's EOS plus the model's own `generation_config.eos_token_id` (an
  int or a list, e.g. an end-of-turn token).
* A response ends at its first stop token. With none among `max_new_tokens` generated tokens it
  is *truncated*: it is reported as such and scored without an EOS.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from safedpo_ray.data.tokenize import format_prompt, has_chat_template


def prompt_seed(seed: int, prompt: str) -> int:
    """A 63-bit seed for one prompt: same prompt and seed → same stream, wherever it runs."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def prompt_token_ids(tokenizer, prompts: list[str], max_prompt_length: int) -> list[list[int]]:
    """Prompt ids as training saw them: chat template or PKU template + BOS, last tokens kept."""
    if not prompts:
        return []
    texts = [format_prompt(tokenizer, str(p)) for p in prompts]
    ids = [list(map(int, x)) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    bos = getattr(tokenizer, "bos_token_id", None)
    if not has_chat_template(tokenizer) and bos is not None:
        ids = [x if x[:1] == [bos] else [bos] + x for x in ids]
    return [x[-max_prompt_length:] for x in ids]


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def stop_token_ids(tokenizer, generation_eos: int | list[int] | None = None) -> list[int]:
    """The tokenizer's EOS, then the model's generation-config EOS ids, without repeats."""
    out: list[int] = []
    for t in _as_ids(getattr(tokenizer, "eos_token_id", None)) + _as_ids(generation_eos):
        if t not in out:
            out.append(t)
    if not out:
        raise ValueError("no stop token: the tokenizer has no eos_token_id and the model's generation config none")
    return out


def generation_eos(model_path: str | None) -> int | list[int] | None:
    """`eos_token_id` of a model's generation_config.json: a local dir's, else a hub id's from the
    local Hugging Face cache (nothing is downloaded); None when there is none."""
    if not model_path:
        return None
    path = Path(model_path) / "generation_config.json"
    if path.exists():
        import json

        return json.loads(path.read_text()).get("eos_token_id")
    if Path(model_path).exists():
        return None
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(model_path, local_files_only=True).eos_token_id
    except (OSError, ValueError):
        return None


def finish_response(tokenizer, generated_ids: list[int], stop_ids: list[int], max_new_tokens: int) -> tuple[str, bool]:
    """(response text, truncated) from the ids generated after the prompt.

    The text ends before the first stop token (what follows is padding) and is decoded without
    special tokens. Truncated: no stop token and the token budget used up."""
    ids = [int(t) for t in generated_ids]
    stops = set(stop_ids)
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    truncated = cut is None and len(ids) >= max_new_tokens
    body = ids if cut is None else ids[:cut]
    return tokenizer.decode(body, skip_special_tokens=True).strip(), truncated


# --------------------------------------------------------------------------- vLLM requests


def vllm_sampling_params(gen, seed: int, stop_ids: list[int] | None = None) -> dict[str, Any]:
    """vLLM SamplingParams for one prompt: greedy is temperature 0; top_k −1 is off in vLLM."""
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": gen.max_new_tokens, "seed": seed}
    if gen.do_sample:
        params = {"temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k if gen.top_k > 0 else -1,
                  "max_tokens": gen.max_new_tokens, "seed": seed}
    if stop_ids:
        params["stop_token_ids"] = list(stop_ids)
    return params


def vllm_prompt_batch(batch: dict[str, list], tokenizer, max_prompt_length: int) -> dict[str, list]:
    """Adds `prompt_ids` to a columnar batch of prompt rows (the vLLM path's tokenization)."""
    batch = dict(batch)
    batch["prompt_ids"] = prompt_token_ids(tokenizer, [str(p) for p in batch["prompt"]], max_prompt_length)
    return batch


def vllm_request(row: dict[str, Any], gen, stop_ids: list[int]) -> dict[str, Any]:
    """One row → what Ray's vLLM stage sends to the engine: `tokenized_prompt` (our ids, so no
    tokenize or chat-template stage adds anything) and `sampling_params` with its own seed."""
    passthrough = {k: v for k, v in row.items() if k not in ("prompt", "prompt_ids")}
    return {**passthrough, "raw_prompt": row["prompt"], "tokenized_prompt": [int(t) for t in row["prompt_ids"]],
            "sampling_params": vllm_sampling_params(gen, prompt_seed(gen.seed, str(row["prompt"])), stop_ids)}


def vllm_response(row: dict[str, Any], tokenizer, stop_ids: list[int], max_new_tokens: int,
                  columns: list[str]) -> dict[str, Any]:
    """A vLLM output row → our row: the prompt columns, `response` and `truncated`."""
    text, truncated = finish_response(tokenizer, list(row.get("generated_tokens") or []), stop_ids, max_new_tokens)
    out = {c: row[c] for c in columns if c != "prompt" and c in row}
    return {**out, "prompt": row["raw_prompt"], "response": text, "truncated": truncated}
