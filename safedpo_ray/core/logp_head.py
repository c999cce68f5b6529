"""The output layer as a log-prob layer: response-token log-probs without full logits.

A causal LM's forward ends with ``logits = lm_head(hidden_states)``: [N, L, vocab] floats (49k–
150k vocabularies), of which SafeDPO needs one number per response token. `install` turns the
model's output layer into a `LogpLinear` (the same parameters; only the class changes, so state
dicts, exports, tied embeddings, LoRA wrappers and DeepSpeed's ZeRO-3 hooks on the module are
untouched). Outside a `targets` block it is the plain linear layer; inside one, it returns the
log-prob of each listed target token from its listed (flattened) position, computed `chunk`
tokens at a time (`logprobs.chunked_token_logps`), as a flat [T] float32 tensor in place of the
logits. Prompt and padding positions never reach the vocabulary projection.

Knows nothing of Ray or DeepSpeed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from safedpo_ray.core.logprobs import chunked_token_logps

#: config attributes under which a model post-processes its logits after the output layer (the
#: head's output would then no longer be the logits): such models keep the full-logits path.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class LogpLinear(nn.Linear):
    """nn.Linear that returns target-token log-probs while `targets` are set (see module doc)."""

    logp_chunk: int = 1024
    logp_targets: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.logp_targets is None:
            return super().forward(hidden)
        positions, ids = self.logp_targets
        flat = hidden.reshape(-1, hidden.shape[-1])
        return chunked_token_logps(flat[positions], self.weight, ids, self.bias, self.logp_chunk)


def output_layer(model: Any) -> nn.Module | None:
    """The output projection of a (possibly LoRA-wrapped) causal LM, or None."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def unsupported_reason(model: Any) -> str | None:
    """Why the log-prob layer cannot stand in for this model's logits (None: it can)."""
    head = output_layer(model)
    if head is None:
        return "the model exposes no output layer (get_output_embeddings)"
    if type(head) not in (nn.Linear, LogpLinear):
        return f"its output layer is a {type(head).__name__}, not a plain nn.Linear"
    config = getattr(model, "config", None)
    for name in LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value not in (None, 0, 1, 1.0):
            return f"it post-processes its logits ({name}={value})"
    return None


def install(model: Any, chunk: int) -> LogpLinear | None:
    """Make the model's output layer a `LogpLinear` computing `chunk` tokens at a time; returns it,
    or None (the model keeps its full-logits path) when `unsupported_reason` says why not."""
    if unsupported_reason(model) is not None:
        return None
    head = output_layer(model)
    head.__class__ = LogpLinear
    head.logp_chunk = int(chunk)
    return head


def find(model: Any) -> LogpLinear | None:
    """The `LogpLinear` inside a model or engine (wrappers included), or None."""
    for module in (model.modules() if isinstance(model, nn.Module) else ()):
        if isinstance(module, LogpLinear):
            return module
    return None


@contextmanager
def targets(head: LogpLinear, positions: torch.Tensor, ids: torch.Tensor) -> Iterator[None]:
    """Within the block the head returns log p(ids[i]) from the hidden state at flat position
    positions[i] (of the [N·L] positions it is given) as a [T] float32 tensor."""
    head.logp_targets = (positions, ids)
    try:
        yield
    finally:
        head.logp_targets = None
