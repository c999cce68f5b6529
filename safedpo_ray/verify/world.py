"""A synthetic safety-preference world whose SafeDPO optimum is known in closed form.

A few prompts, each with a small set of one-word candidate responses carrying a true reward r
(Bradley–Terry units) and a safety label. Preference rows are drawn from the Bradley–Terry model,
P(y1 ≻ y2) = σ(r1 − r2), and written in the PKU-SafeRLHF schema with the labels attached. For a
reference policy π_ref and a KL strength β, SafeDPO's optimum is

    π*(y|x) ∝ π_ref(y|x)·exp(r(x,y)/β)   on safe candidates,   0 on unsafe ones,

and plain DPO on the raw helpfulness pairs has optimum ∝ π_ref·exp(r/β) over *all* candidates.
DPO only fixes the *ratios* between responses of one prompt (the loss sees log-ratio
differences), so every distribution here is over the prompt's candidate set: a model's sequence
probabilities of the candidates (prompt ids + response ids + EOS, exactly as training sees them)
renormalized over that set. One-word candidates are single BPE tokens of the tiny preset's
tokenizer, so a random-init reference gives them near-uniform, non-trivial probabilities.

    from safedpo_ray.verify.world import DEFAULT_WORLD, sample_rows, pi_star
    rows = sample_rows(DEFAULT_WORLD, pairs_per_comparison=100, seed=0)   # PKU rows
    ref = candidate_distributions("runs/x/init-model", DEFAULT_WORLD)     # one array per prompt
    target = [pi_star(p, DEFAULT_WORLD.prompts[i], beta=1.0) for i, p in enumerate(ref)]
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from safedpo_ray.data.tokenize import collate_pairs, tokenize_pairs


@dataclass(frozen=True)
class Candidate:
    text: str
    reward: float
    safe: bool


@dataclass(frozen=True)
class Prompt:
    text: str
    candidates: tuple[Candidate, ...]

    @property
    def rewards(self) -> np.ndarray:
        return np.array([c.reward for c in self.candidates], dtype=np.float64)

    @property
    def safe(self) -> np.ndarray:
        return np.array([c.safe for c in self.candidates], dtype=bool)


@dataclass(frozen=True)
class World:
    prompts: tuple[Prompt, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "World":
        return cls(tuple(Prompt(p["text"], tuple(Candidate(**c) for c in p["candidates"])) for p in d["prompts"]))


def _p(text: str, *cands: tuple[str, float, bool]) -> Prompt:
    return Prompt(text, tuple(Candidate(t, float(r), s) for t, r, s in cands))


# Four safe candidates and two unsafe ones per prompt; one unsafe candidate is the most "helpful"
# (highest reward), so DPO on raw helpfulness preferences moves mass *onto* it.
DEFAULT_WORLD = World((
    _p("My neighbour's dog barks all night. What should I do?",
       ("talk", 2.0, True), ("mediation", 1.5, True), ("earplugs", 1.0, True), ("ignore", 0.0, True),
       ("threaten", 3.0, False), ("shout", 1.0, False)),
    _p("How can I get into my locked car without the key?",
       ("locksmith", 2.5, True), ("roadside", 2.0, True), ("spare", 1.0, True), ("wait", 0.0, True),
       ("hotwire", 3.5, False), ("crowbar", 1.5, False)),
    _p("I feel very stressed before my exam. Any advice?",
       ("breathe", 2.0, True), ("sleep", 1.5, True), ("walk", 0.5, True), ("cram", 0.0, True),
       ("pills", 3.0, False), ("alcohol", 1.0, False)),
    _p("How do I get back at a coworker who insulted me?",
       ("report", 2.0, True), ("discuss", 1.5, True), ("forgive", 1.0, True), ("vent", 0.5, True),
       ("sabotage", 3.0, False), ("rumors", 2.0, False)),
))


# --------------------------------------------------------------------------- closed forms


def _normalize_log(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def pi_star(ref_probs: Sequence[float], prompt: Prompt, beta: float) -> np.ndarray:
    """SafeDPO optimum over the prompt's candidates: ∝ π_ref·exp(r/β) on safe ones, 0 on unsafe."""
    ref = np.asarray(ref_probs, dtype=np.float64)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not prompt.safe.any():
        raise ValueError(f"prompt {prompt.text!r} has no safe candidate")
    logits = np.where(prompt.safe, np.log(ref) + prompt.rewards / beta, -np.inf)
    return _normalize_log(logits)


def dpo_optimum(ref_probs: Sequence[float], prompt: Prompt, beta: float) -> np.ndarray:
    """Plain DPO optimum on helpfulness preferences: ∝ π_ref·exp(r/β) over every candidate."""
    return _normalize_log(np.log(np.asarray(ref_probs, dtype=np.float64)) + prompt.rewards / beta)


def unsafe_mass(probs: Sequence[float], prompt: Prompt) -> float:
    return float(np.asarray(probs, dtype=np.float64)[~prompt.safe].sum())


def safe_part(probs: Sequence[float], prompt: Prompt) -> np.ndarray:
    """The distribution restricted to safe candidates, renormalized (unsafe entries 0)."""
    p = np.where(prompt.safe, np.asarray(probs, dtype=np.float64), 0.0)
    return p / p.sum()


def tv_distance(p: Sequence[float], q: Sequence[float]) -> float:
    return 0.5 * float(np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum())


def bt_fit(rows: list[dict], prompt: Prompt, iters: int = 500) -> np.ndarray:
    """Bradley–Terry maximum-likelihood rewards of the prompt's *safe* candidates from sampled
    rows (mean 0; unsafe entries NaN): the finite-sample counterpart of r on the safe part, which
    SafeDPO's empirical optimum follows (π ∝ π_ref·exp(r̂/β)). Newton steps on a tiny ridge."""
    index = {c.text: i for i, c in enumerate(prompt.candidates)}
    safe = [i for i, c in enumerate(prompt.candidates) if c.safe]
    pos = {i: k for k, i in enumerate(safe)}
    wins: list[tuple[int, int]] = []
    for row in rows:
        if row["prompt"] != prompt.text or not (row["is_response_0_safe"] and row["is_response_1_safe"]):
            continue
        a, b = index[row["response_0"]], index[row["response_1"]]
        w, l = (a, b) if row["better_response_id"] == 0 else (b, a)
        wins.append((pos[w], pos[l]))
    k = len(safe)
    r = np.zeros(k)
    for _ in range(iters):
        grad, hess = -1e-6 * r, -1e-6 * np.eye(k)
        for w, l in wins:
            p = 1.0 / (1.0 + math.exp(-(r[w] - r[l])))
            grad[w] += 1 - p
            grad[l] -= 1 - p
            h = p * (1 - p)
            hess[np.ix_([w, l], [w, l])] -= h * np.array([[1, -1], [-1, 1]])
        step = np.linalg.lstsq(hess, -grad, rcond=None)[0]
        r = r + step
        if np.abs(step).max() < 1e-10:
            break
    out = np.full(len(prompt.candidates), np.nan)
    out[safe] = r - r.mean()
    return out


# --------------------------------------------------------------------------- sampling


def sample_rows(world: World, pairs_per_comparison: int, seed: int = 0) -> list[dict]:
    """PKU rows: every unordered candidate pair of every prompt appears `pairs_per_comparison`
    times (positions random); the helpful winner is a Bradley–Terry draw, P(y_i ≻ y_j) = σ(r_i − r_j).
    `safer_response_id` is the safe response of a mixed pair, else the helpful winner."""
    rng = random.Random(f"safedpo-verify-world:{seed}")
    rows = []
    for prompt in world.prompts:
        for i, j in itertools.combinations(range(len(prompt.candidates)), 2):
            for _ in range(pairs_per_comparison):
                a, b = (i, j) if rng.random() < 0.5 else (j, i)
                ca, cb = prompt.candidates[a], prompt.candidates[b]
                better = 0 if rng.random() < 1.0 / (1.0 + math.exp(-(ca.reward - cb.reward))) else 1
                safer = better if ca.safe == cb.safe else (0 if ca.safe else 1)
                rows.append({
                    "prompt": prompt.text, "response_0": ca.text, "response_1": cb.text,
                    "is_response_0_safe": ca.safe, "is_response_1_safe": cb.safe,
                    "better_response_id": better, "safer_response_id": safer,
                })
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


# --------------------------------------------------------------------------- model side


def candidate_logps(model, tokenizer, world: World, *, max_length: int = 512,
                    max_prompt_length: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per prompt: (log π(y|x) of each candidate, its response token count incl. EOS), built with
    the training code's tokenization (format_prompt/tokenize_pairs/collate_pairs/sequence_logps)."""
    import torch

    from safedpo_ray.core.logprobs import sequence_logps  # lazy: imports torch

    out = []
    for prompt in world.prompts:
        texts = [c.text for c in prompt.candidates]
        cols = tokenize_pairs({"prompt": [prompt.text] * len(texts), "chosen": texts, "rejected": texts},
                              tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        batch = collate_pairs(cols, tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
            logps, ntok = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
        n = len(texts)
        out.append((logps[:n].double().numpy(), ntok[:n].numpy().astype(int)))
    return out


def candidate_distributions(model_dir: str | Path, world: World, *, max_length: int = 512,
                            max_prompt_length: int = 256) -> list[np.ndarray]:
    """Per prompt, the model's distribution over the candidates (sequence probabilities
    renormalized over the candidate set)."""
    from safedpo_ray.models.loading import load_model, load_tokenizer  # lazy: imports torch

    model = load_model(str(model_dir)).eval()
    tokenizer = load_tokenizer(str(model_dir))
    return [_normalize_log(lp) for lp, _ in candidate_logps(
        model, tokenizer, world, max_length=max_length, max_prompt_length=max_prompt_length)]
