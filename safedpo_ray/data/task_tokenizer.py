"""The tokenizer of a data task: the `tokenizers` (Rust) backend alone when it encodes exactly as
the transformers tokenizer does, else the transformers tokenizer.

A preparation task that loads a transformers tokenizer first imports transformers and torch:
3-4 s of every task process's start, measured here, against ~0.01 s for the backend alone. The
driver builds a `backend_spec` from the tokenizer it loads anyway; the spec is used only when the
transformers tokenizer's encoding is the backend's own (its class keeps transformers' encoding
path, no chat template) and the two give the same ids on the data's own texts.
"""

from __future__ import annotations

from typing import Any

from safedpo_ray.data.tokenize import PKU_TEMPLATE, has_chat_template


class BackendTokenizer:
    """What `tokenize_pairs` needs of a tokenizer, from a `backend_spec`: ids of texts without
    special tokens, `bos_token_id`, `eos_token_id`, and no chat template (the PKU template)."""

    chat_template = None

    def __init__(self, spec: dict[str, Any]):
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(spec["json"])
        self._backend.no_truncation()  # as transformers sets them for a call without truncation/padding
        self._backend.no_padding()
        self._backend.encode_special_tokens = spec["split_special_tokens"]
        self.bos_token_id, self.eos_token_id = spec["bos_token_id"], spec["eos_token_id"]

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]


def backend_spec(tokenizer, texts: list[str]) -> dict[str, Any] | None:
    """A spec for `BackendTokenizer`, or None when the backend alone would not give exactly
    `tokenizer`'s ids (no Rust backend, a chat template, a subclass with its own encoding, or any
    text of `texts`, alone or in the PKU template, encoded differently)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend


    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is None or has_chat_template(tokenizer) or not isinstance(tokenizer, TokenizersBackend)
            or type(tokenizer)._encode_plus is not TokenizersBackend._encode_plus):
        return None
    spec = {"json": backend.to_str(), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False))}
    texts = [str(t) for t in texts] + [PKU_TEMPLATE.format(prompt=t) for t in texts]
    try:
        fast = BackendTokenizer(spec).encode_texts(texts)
    except Exception:  # noqa: BLE001  (a backend that does not round-trip: transformers' path)
        return None
    expected = [list(map(int, ids)) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return spec if fast == expected else None
