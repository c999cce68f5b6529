"""Model weights load only through safetensors, or through `torch.load(weights_only=True)`.

    model = AutoModelForCausalLM.from_pretrained(path, **weights_kwargs(path), ...)
    with explain_refused_pickle(path):
        ...

A pickle checkpoint (`pytorch_model.bin`, `*.pt`) can run any code when it is unpickled. What we
save is always safetensors (`export_model`, the tiny model, a GGUF conversion), and a directory
that has safetensors files is loaded from them only (`use_safetensors=True`: a pickle lying beside
them is never read). A directory or hub repository that ships only pickle weights (older hub
models, e.g. some safe-rlhf releases) is loaded with `weights_only=True`, which unpickles tensors
and plain containers and refuses anything else; a refused file becomes a `UnsafeWeightsError` that
says how to convert it. `trust_remote_code` is passed by each caller from its configuration and is
off by default.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

from safedpo_ray.errors import UserError

logger = logging.getLogger(__name__)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class UnsafeWeightsError(UserError):
    """Weights that would need an unrestricted unpickling to load."""


def weights_kwargs(name_or_path: Any) -> dict[str, Any]:
    """`from_pretrained` keyword arguments: safetensors only where the directory has them,
    `weights_only=True` always (a pickle-only model is loaded through it)."""
    kwargs: dict[str, Any] = {"weights_only": True}
    path = Path(str(name_or_path))
    if path.is_dir():
        if any(path.glob("*.safetensors")):
            kwargs["use_safetensors"] = True
        elif any(f.suffix in PICKLE_SUFFIXES for f in path.iterdir()):
            kwargs["use_safetensors"] = False
            logger.warning("%s has pickle weights only: loading them with torch.load(weights_only=True) "
                           "(convert them to safetensors to avoid pickles altogether)", path)
    return kwargs


@contextlib.contextmanager
def explain_refused_pickle(name_or_path: Any) -> Iterator[None]:
    """Turn torch's refusal of a pickle that holds more than tensors into a clear error."""
    try:
        yield
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        if "weights_only" in text or "UnpicklingError" in text:
            raise UnsafeWeightsError(
                f"model {name_or_path}: its weights are a pickle that torch.load(weights_only=True) refuses "
                "(it holds objects other than tensors, which could run code when loaded). Only load it if you "
                "trust it: convert it once to safetensors (`AutoModel.from_pretrained(path, weights_only=False)` "
                "then `save_pretrained(out, safe_serialization=True)`) and use that directory. "
                f"({text.splitlines()[0][:200]})") from exc
        raise


def check_pickle_weights(name_or_path: Any) -> None:
    """On the driver, before Ray starts: a local model directory whose only weights are pickles
    that `torch.load(weights_only=True)` would refuse is an UnsafeWeightsError now, not inside a
    worker a minute later. The pickles' globals are listed without unpickling or reading tensors
    (`torch.serialization.get_unsafe_globals_in_checkpoint`); hub ids are checked where loaded."""
    path = Path(str(name_or_path))
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return  # a hub id, or safetensors (a pickle beside them is never read)
    import torch.serialization as ts

    for f in sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()):
        try:
            unsafe = ts.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as exc:  # noqa: BLE001  (not a zip checkpoint: the load itself decides, with its message)
            logger.debug("cannot list the globals of %s: %s", f, exc)
            continue
        if unsafe:
            raise UnsafeWeightsError(
                f"model {name_or_path}: {f.name} is a pickle that torch.load(weights_only=True) refuses (it "
                f"holds {', '.join(unsafe[:3])}{' and more' if len(unsafe) > 3 else ''}, objects other than "
                "tensors, which could run code when loaded). Only load it if you trust it: convert it once to "
                "safetensors (`AutoModel.from_pretrained(path, weights_only=False)` then "
                "`save_pretrained(out, safe_serialization=True)`) and use that directory")
