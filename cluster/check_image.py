"""Checks the image's torch, CUDA and vLLM agree; run at the end of cluster/Dockerfile (no GPU
needed). Exit status 1 with the problems printed, 0 when all agree.

    python cluster/check_image.py
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path


def pinned(constraints: str, name: str) -> str | None:
    for line in constraints.splitlines():
        m = re.match(rf"\s*{re.escape(name)}\s*==\s*([^\s#;]+)", line)
        if m:
            return m.group(1)
    return None


def problems(*, torch_version: str, torch_cuda: str | None, image_cuda: str | None, constraints: str,
             vllm_version: str | None) -> list[str]:
    """What is wrong with an image holding these versions (an empty list: nothing)."""
    found = []
    want = pinned(constraints, "torch")
    if want and torch_version.split("+")[0] != want:
        found.append(f"torch {torch_version} is not constraints.txt's {want}")
    if torch_cuda is None:
        found.append(f"torch {torch_version} is a CPU build")
    elif image_cuda is None:
        found.append("the base image does not say its CUDA version (CUDA_VERSION unset)")
    elif torch_cuda.split(".")[0] != image_cuda.split(".")[0]:
        found.append(f"torch is built for CUDA {torch_cuda}, the image's toolkit is CUDA {image_cuda}: "
                     "pick TORCH_CUDA for the base image's CUDA major")
    if vllm_version is None:
        found.append("vllm is not installed (evaluate's engine: vllm)")
    return found


def main() -> int:
    import torch

    try:
        vllm_version = importlib.metadata.version("vllm") if importlib.util.find_spec("vllm") else None
    except importlib.metadata.PackageNotFoundError:
        vllm_version = None
    constraints = Path(__file__).resolve().parents[1] / "constraints.txt"
    found = problems(torch_version=torch.__version__, torch_cuda=torch.version.cuda,
                     image_cuda=os.environ.get("CUDA_VERSION"), constraints=constraints.read_text(),
                     vllm_version=vllm_version)
    for problem in found:
        print(f"image check: {problem}", file=sys.stderr)
    if not found:
        print(f"image check: torch {torch.__version__} (CUDA {torch.version.cuda}), "
              f"image CUDA {os.environ.get('CUDA_VERSION')}, vllm {vllm_version}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
