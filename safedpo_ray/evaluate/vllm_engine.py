"""The 'vllm' generation engine: Ray Data LLM batch inference (`ray.data.llm`) with vLLM.

Same rows in and out as the 'hf' engine, and the same prompts token for token: the prompt ids
are built by `decoding.prompt_token_ids` (the function the 'hf' engine uses) and sent as
`tokenized_prompt`, so neither Ray's chat-template stage nor its tokenize stage runs (the latter
would add a second BOS after a chat template that writes one, and would not truncate). Stop
tokens are the tokenizer's EOS plus the model's generation-config EOS ids, as for 'hf'; the
response text and the `truncated` flag come from the generated ids through
`decoding.finish_response`. Each prompt carries its own sampling seed.

    safedpo-ray evaluate --model runs/r1 --data pku.jsonl \
        generation.engine=vllm generation.gpus_per_actor=1 generation.num_actors=8

LoRA runs: evaluate `<run>/model/merged` (train with run.export_merged=true) with vllm.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from safedpo_ray.config.evaluation import GenerationConfig
from safedpo_ray.evaluate.decoding import (
    generation_eos,
    stop_token_ids,
    vllm_prompt_batch,
    vllm_request,
    vllm_response,
    vllm_sampling_params,
)
from safedpo_ray.models.loading import load_tokenizer
from safedpo_ray.models.resolve import EvalError, ModelSpec, tokenizer_source
from safedpo_ray.runtime import storage

__all__ = ["require_vllm", "vllm_sampling_params", "vllm_processor_kwargs", "vllm_generate"]


def require_vllm() -> None:
    """Checked where the command runs: the driver (on a cluster, the head) builds the Ray Data LLM
    processor, and the GPU nodes run it, so both need vLLM."""
    if importlib.util.find_spec("vllm") is None:
        import socket

        raise EvalError(
            f"generation.engine=vllm: vllm is not installed on {socket.gethostname()}, where this command "
            "runs (on a cluster: the job's driver, on the head node); the driver and the GPU nodes both "
            "need it: pip install 'safedpo-ray[vllm]' (the vLLM and ray[llm] this package pins; "
            "cluster/Dockerfile installs it on every pod), or pip install vllm matching your CUDA/torch "
            "build; or use generation.engine=hf")


def vllm_processor_kwargs(model_path: str, gen: GenerationConfig, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments of `ray.data.llm.vLLMEngineProcessorConfig` for our generation config."""
    engine: dict[str, Any] = {
        "tensor_parallel_size": gen.vllm_tensor_parallel_size,
        "gpu_memory_utilization": gen.vllm_gpu_memory_utilization,
        "trust_remote_code": trust_remote_code,
    }
    if gen.vllm_max_model_len:
        engine["max_model_len"] = gen.vllm_max_model_len
    kwargs: dict[str, Any] = {
        "model_source": model_path,
        "engine_kwargs": engine,
        "batch_size": gen.batch_size,
        "concurrency": gen.num_actors,
        # Prompts arrive as token ids (decoding.prompt_token_ids); responses are decoded from the
        # generated ids by decoding.finish_response: no Ray stage touches the tokens.
        "chat_template_stage": False,
        "tokenize_stage": False,
        "detokenize_stage": False,
    }
    if gen.vllm_accelerator_type:
        kwargs["accelerator_type"] = gen.vllm_accelerator_type
    return kwargs


def _model_path(spec: ModelSpec) -> str:
    if spec.adapter:
        raise EvalError(f"model '{spec.label}' is a LoRA adapter: generation.engine=vllm needs full weights "
                        "(train with run.export_merged=true and pass <run>/model/merged)")
    return spec.path


def _local_model_source(spec: ModelSpec, uri: str) -> str:
    """vLLM's engine actors open `model_source` as a path of their own node and cannot fetch a
    storage URI with its options (endpoint, region); Ray Data LLM gives us no hook to fetch it
    per node. On a one-node Ray the driver's copy is the engine's copy; on several nodes it is
    refused with what to do instead."""
    nodes = storage.alive_nodes()
    if len(nodes) > 1:
        raise EvalError(
            f"model '{spec.label}': generation.engine=vllm cannot read '{storage.redact(uri)}' on a "
            f"{len(nodes)}-node cluster (vLLM opens model_source as a path on each GPU node, and a path on "
            "this driver's disk is not on theirs): give a hub id or a directory every node mounts, "
            "or use generation.engine=hf, whose actors fetch the URI on their own nodes")
    return storage.localize(uri)


_TOKENIZERS: dict[tuple[str, bool], Any] = {}


def _tokenizer(source: str, trust_remote_code: bool):
    """One tokenizer per worker process (postprocess runs row by row)."""
    key = (source, trust_remote_code)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(source, trust_remote_code=trust_remote_code)
    return _TOKENIZERS[key]


def vllm_generate(ds, spec: ModelSpec, gen: GenerationConfig, columns: list[str], *, max_prompt_length: int,
                  trust_remote_code: bool = False):
    """Dataset of prompt rows (`columns`) → the same rows plus `response` and `truncated`."""
    require_vllm()
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    model_path = _model_path(spec)
    source = tokenizer_source(spec)
    if storage.is_remote(model_path):
        model_path = source = _local_model_source(spec, model_path)
    stop_ids = stop_token_ids(_tokenizer(source, trust_remote_code), generation_eos(model_path))

    def add_ids(df):
        df = df.copy()
        df["prompt_ids"] = vllm_prompt_batch({"prompt": list(df["prompt"])}, _tokenizer(source, trust_remote_code),
                                             max_prompt_length)["prompt_ids"]
        return df

    ds = ds.map_batches(add_ids, batch_format="pandas")
    config = vLLMEngineProcessorConfig(**vllm_processor_kwargs(model_path, gen, trust_remote_code=trust_remote_code))

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return vllm_request(row, gen, stop_ids)

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        return vllm_response(row, _tokenizer(source, trust_remote_code), stop_ids, gen.max_new_tokens, columns)

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    return processor(ds)
