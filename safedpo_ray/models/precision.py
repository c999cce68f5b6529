"""The dtype weights are loaded in, from the training precision (torch-free).

DeepSpeed keeps the module in the compute dtype (bf16: parameters cast, buffers left as they
are) and builds its fp32 master weights from those bf16 parameters; loading in bf16 directly gives
the same parameters with half the host memory of a float32 load (27 -> 13.5 GB for a 7B model),
and the reference is cast on the host before it moves to the GPU."""

from __future__ import annotations

WEIGHTS_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def weights_dtype(precision: str) -> str:
    """`train.precision` ("bf16", "fp32") -> the `load_model` dtype its weights load in."""
    try:
        return WEIGHTS_DTYPES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(WEIGHTS_DTYPES)}") from None
