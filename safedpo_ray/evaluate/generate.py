"""One response per prompt, with Ray Data `map_batches` over an actor pool (CPU or GPU actors).

Sampling is seeded per prompt, not per actor or batch: the token drawn at step t for a prompt
depends only on (seed, prompt text, t) and the model's distribution, so any number of actors and
any batching give the same responses (`generate_local` is the one-process reference).

    from safedpo_ray.evaluate.generate import generate_with_ray
    rows = generate_with_ray(spec, [{"prompt_id": "p1", "prompt": "How do I bake bread?"}], cfg.generation)

Engines: 'hf' (transformers `generate`, everywhere) and 'vllm' (ray.data.llm, GPU clusters; see
evaluate/vllm_engine.py). Both take and return the same rows: the input columns plus `response`
and `truncated` (no stop token within `max_new_tokens`); both build prompts, stop tokens and
responses with the same functions (evaluate/decoding.py). Inputs always go to the device the
model is on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safedpo_ray.config.evaluation import EvalDataConfig, GenerationConfig
from safedpo_ray.data.sources import read_rows
from safedpo_ray.evaluate.decoding import finish_response, prompt_seed, prompt_token_ids, stop_token_ids
from safedpo_ray.evaluate.vllm_engine import require_vllm, vllm_generate
from safedpo_ray.models.loading import load_tokenizer
from safedpo_ray.models.resolve import EvalError, ModelSpec, load_policy, rows_dataset, tokenizer_source

PROMPT_COLUMNS = ("prompt_id", "prompt", "set", "xstest_id", "xstest_type", "xstest_label")
__all__ = ["prompt_seed", "encode_prompts", "generate_batch", "generate_local", "generate_with_ray"]


def _uniform(seed: int, step: int) -> float:
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return float(torch.rand(1, generator=g, dtype=torch.float64))


def sample_token(logits: torch.Tensor, u: float, *, temperature: float, top_p: float, top_k: int) -> int:
    """Inverse-CDF draw with uniform `u` from softmax(logits / T) restricted by top-k / top-p."""
    probs, order = torch.sort(torch.softmax(logits.double() / temperature, dim=-1), descending=True)
    if top_k > 0:
        probs, order = probs[:top_k], order[:top_k]
    if top_p < 1.0:
        before = torch.cumsum(probs, 0) - probs  # mass of the tokens ranked above each one
        keep = before < top_p
        probs, order = probs[keep], order[keep]
    cdf = torch.cumsum(probs / probs.sum(), 0)
    idx = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype, device=cdf.device))), len(cdf) - 1)
    return int(order[idx])


class PerPromptSampler:
    """A logits processor that samples each row from its own seeded stream and leaves only the
    drawn token unmasked, so greedy decoding in `generate` emits exactly that token."""

    def __init__(self, seeds: list[int], prompt_length: int, *, temperature: float, top_p: float, top_k: int):
        self.seeds, self.prompt_length = seeds, prompt_length
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        out = torch.full_like(scores, float("-inf"))
        for i, seed in enumerate(self.seeds):
            tok = sample_token(scores[i], _uniform(seed, step), temperature=self.temperature,
                               top_p=self.top_p, top_k=self.top_k)
            out[i, tok] = 0.0
        return out


def encode_prompts(tokenizer, prompts: list[str], max_prompt_length: int) -> list[list[int]]:
    """Prompt ids as training saw them (see decoding.prompt_token_ids; both engines use it)."""
    return prompt_token_ids(tokenizer, prompts, max_prompt_length)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus the model's own generation-config EOS ids (end-of-turn tokens)."""
    generation_config = getattr(model, "generation_config", None)
    return stop_token_ids(tokenizer, getattr(generation_config, "eos_token_id", None))


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], gen: GenerationConfig, *, max_prompt_length: int,
                   device: str | torch.device | None = None, stop_ids: list[int] | None = None) -> list[dict[str, Any]]:
    """{response, truncated} for a batch of prompts (left-padded), on the model's device."""
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LogitsProcessorList

    device = model_device(model) if device is None else torch.device(device)
    stop_ids = stop_ids or model_stop_ids(model, tokenizer)
    ids = encode_prompts(tokenizer, prompts, max_prompt_length)
    width, pad = max(map(len, ids)), tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], dtype=torch.long, device=device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long, device=device)
    config = HFGenerationConfig(max_new_tokens=gen.max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=pad, eos_token_id=list(stop_ids),
                                bos_token_id=getattr(tokenizer, "bos_token_id", None))
    processors = LogitsProcessorList()
    if gen.do_sample:
        seeds = [prompt_seed(gen.seed, p) for p in prompts]
        processors.append(PerPromptSampler(seeds, width, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k))
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                         logits_processor=processors)
    results = []
    for row in out[:, width:].tolist():
        text, truncated = finish_response(tokenizer, row, stop_ids, gen.max_new_tokens)
        results.append({"response": text, "truncated": truncated})
    return results


class HFGenerator:
    """Ray Data actor: loads the policy once, then generates for each batch it is given."""
    def __init__(self, spec: dict[str, Any], gen: dict[str, Any], max_prompt_length: int,
                 dtype: str = "float32", trust_remote_code: bool = False):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.spec, self.gen, self.max_prompt_length = ModelSpec(**spec), GenerationConfig(**gen), max_prompt_length
        self.tokenizer = load_tokenizer(tokenizer_source(self.spec), trust_remote_code=trust_remote_code)
        self.model = load_policy(self.spec, dtype=dtype, trust_remote_code=trust_remote_code, device=self.device)
        self.stop_ids = model_stop_ids(self.model, self.tokenizer)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        out = generate_batch(self.model, self.tokenizer, prompts, self.gen, max_prompt_length=self.max_prompt_length,
                             device=self.device, stop_ids=self.stop_ids)
        return {**batch, "response": np.array([o["response"] for o in out], dtype=object),
                "truncated": np.array([o["truncated"] for o in out], dtype=bool)}


def generate_local(spec: ModelSpec, rows: list[dict[str, Any]], gen: GenerationConfig, *,
                   max_prompt_length: int, dtype: str = "float32", batch_size: int | None = None) -> list[dict[str, Any]]:
    """The same generation in this process (reference for tests; small jobs without Ray)."""
    actor = HFGenerator(spec.to_dict(), dataclasses.asdict(gen), max_prompt_length, dtype)
    out: list[dict[str, Any]] = []
    size = batch_size or gen.batch_size
    for i in range(0, len(rows), size):
        chunk = rows[i:i + size]
        generated = generate_batch(actor.model, actor.tokenizer, [r["prompt"] for r in chunk], gen,
                                   max_prompt_length=max_prompt_length, device=actor.device, stop_ids=actor.stop_ids)
        out.extend({**r, **g} for r, g in zip(chunk, generated))
    return out


def generate_with_ray(spec: ModelSpec, rows: list[dict[str, Any]], gen: GenerationConfig, *,
                      max_prompt_length: int = 256, dtype: str = "float32", trust_remote_code: bool = False,
                      progress: bool = True) -> list[dict[str, Any]]:
    """Rows (with at least prompt_id and prompt) → the same rows plus `response` and `truncated`, in input order."""
    import ray.data

    if not rows:
        return []
    ds, columns, blocks = rows_dataset(rows, gen.batch_size, progress=progress)
    if gen.engine == "vllm":
        ds = vllm_generate(ds, spec, gen, [*columns, "_order"], max_prompt_length=max_prompt_length,
                           trust_remote_code=trust_remote_code)
    else:
        ds = ds.map_batches(
            HFGenerator,
            fn_constructor_kwargs={"spec": spec.to_dict(), "gen": dataclasses.asdict(gen),
                                   "max_prompt_length": max_prompt_length, "dtype": dtype,
                                   "trust_remote_code": trust_remote_code},
            batch_size=gen.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(gen.num_actors, blocks)),
            num_cpus=gen.cpus_per_actor, num_gpus=gen.gpus_per_actor or None,
        )
    out = sorted(ds.take_all(), key=lambda r: int(r["_order"]))
    return [{**{c: r[c] for c in columns}, "response": str(r["response"]), "truncated": _flag(r.get("truncated"))}
            for r in out]


def _flag(value: Any) -> bool:
    """A boolean column value back from Ray Data (numpy bool, bool or its string)."""
    return str(value).strip().lower() in ("true", "1")


# --------------------------------------------------------------------------- prompts


def read_prompt_file(path: str) -> list[str]:
    """Prompts from .txt (one per line) or a .jsonl/.json/.csv/.parquet file with a 'prompt' column."""
    p = Path(path)
    if not p.exists():
        raise EvalError(f"prompt file {path} does not exist")
    if p.suffix.lower() == ".txt":
        return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = read_rows(str(p))
    if rows and "prompt" not in rows[0]:
        raise EvalError(f"{path}: no 'prompt' column (columns: {sorted(rows[0])})")
    return [str(r["prompt"]) for r in rows if str(r.get("prompt") or "").strip()]


def prompt_rows(data: EvalDataConfig, source_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Distinct prompts to generate for, in first-seen order, with ids 'data-<n>'."""
    prompts = read_prompt_file(data.prompts) if data.prompts else [str(r.get("prompt", "")) for r in source_rows]
    seen: dict[str, None] = {}
    for p in prompts:
        if p.strip() and p not in seen:
            seen[p] = None
    unique = list(seen)[: data.max_prompts] if data.max_prompts else list(seen)
    return [{"prompt_id": f"data-{i}", "prompt": p, "set": "data"} for i, p in enumerate(unique)]


def check_engine(gen: GenerationConfig) -> None:
    """Fail before any work when the engine cannot run here."""
    if gen.engine == "vllm":
        require_vllm()
