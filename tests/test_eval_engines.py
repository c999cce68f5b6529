"""Both generation engines see the same prompts token for token, stop on the same tokens, flag
truncated responses, and put inputs where the model is. No Ray, no vllm: the 'hf' path runs
`generate_batch` against a recording stub model, the 'vllm' path runs the functions its Ray
processor calls (decoding.vllm_prompt_batch / vllm_request / vllm_response)."""

from types import SimpleNamespace

import pytest
import torch

from safedpo_ray.config.evaluation import GenerationConfig

pytestmark = pytest.mark.timeout(60)

TEXTS = ["How do I bake sourdough bread at home?", "Hello there, how can I help you today?",
         "Explain how to fix a flat bicycle tire.", "I'm sorry, I can't help with that."] * 5
PROMPTS = ["How do I bake bread?", "Hi", "Explain how to fix a flat bicycle tire, step by step, with the tools "
           "you need and how long each step takes for someone who has never done it before. " * 3]
MAX_PROMPT = 64
CHAT = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from safedpo_ray.models.loading import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tok"), TEXTS, seed=0, hidden_size=32, num_layers=1, num_heads=2,
                            intermediate_size=64, vocab_size=300)


def make_tokenizer(tiny_dir, *, chat: bool, adds_bos: bool):
    """The tiny BPE, optionally adding BOS itself (as Llama tokenizers do) and with a chat
    template that writes BOS (as Llama-3's does), plus an end-of-turn special token."""
    from tokenizers import AddedToken, processors

    from safedpo_ray.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    if adds_bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)])
    tok.add_tokens([AddedToken("<|eot|>", special=True)])
    if chat:
        tok.chat_template = CHAT
    return tok


class RecordingModel(torch.nn.Module):
    """Stands in for a causal LM: records what `generate` gets, answers with fixed continuations."""

    def __init__(self, continuations, *, device="cpu", generation_eos=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device=device))
        self.generation_config = SimpleNamespace(eos_token_id=generation_eos)
        self.continuations, self.calls = continuations, []

    def generate(self, input_ids, attention_mask, generation_config, logits_processor):
        assert input_ids.device == self.weight.device and attention_mask.device == self.weight.device
        self.calls.append({"config": generation_config, "device": input_ids.device})
        if input_ids.device.type != "meta":
            self.calls[-1]["ids"] = [[t for t, m in zip(row, mask) if m]
                                     for row, mask in zip(input_ids.tolist(), attention_mask.tolist())]
        width = input_ids.shape[1]
        conts = self.continuations[: input_ids.shape[0]]
        longest = max(map(len, conts))
        pad = generation_config.pad_token_id
        return torch.tensor([[pad] * width + c + [pad] * (longest - len(c)) for c in conts])


@pytest.mark.parametrize("chat", [False, True], ids=["pku-template", "chat-template"])
@pytest.mark.parametrize("adds_bos", [False, True], ids=["plain-bpe", "bos-adding"])
def test_hf_and_vllm_prompt_ids_are_identical(tiny_dir, chat, adds_bos):
    from safedpo_ray.evaluate.decoding import vllm_prompt_batch, vllm_request
    from safedpo_ray.evaluate.generate import generate_batch
    from safedpo_ray.evaluate.vllm_engine import vllm_processor_kwargs

    tok = make_tokenizer(tiny_dir, chat=chat, adds_bos=adds_bos)
    gen = GenerationConfig(max_new_tokens=4)
    stub = RecordingModel([[tok.eos_token_id]] * len(PROMPTS))
    generate_batch(stub, tok, PROMPTS, gen, max_prompt_length=MAX_PROMPT)
    hf_ids = stub.calls[0]["ids"]

    batch = vllm_prompt_batch({"prompt": PROMPTS, "prompt_id": ["a", "b", "c"]}, tok, MAX_PROMPT)
    rows = [{k: batch[k][i] for k in batch} for i in range(len(PROMPTS))]
    stop = [tok.eos_token_id]
    vllm_ids = [vllm_request(r, gen, stop)["tokenized_prompt"] for r in rows]
    assert vllm_ids == hf_ids
    # the engine gets these ids as they are: no Ray stage templates or tokenizes again
    kwargs = vllm_processor_kwargs("/m", GenerationConfig(engine="vllm", gpus_per_actor=1))
    assert kwargs["tokenize_stage"] is False and kwargs["chat_template_stage"] is False

    bos = tok.bos_token_id
    for ids in hf_ids[:2]:  # short prompts: one BOS, first
        assert ids[0] == bos and ids.count(bos) == 1
    assert len(hf_ids[2]) == MAX_PROMPT  # the long prompt keeps its last tokens on both engines
    if chat and adds_bos:
        # what Ray's tokenize stage did with the templated text: a second BOS
        text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                       add_generation_prompt=True)
        assert tok(text)["input_ids"][:2] == [bos, bos] and hf_ids[0][:2] != [bos, bos]


def test_stop_tokens_and_truncation_on_both_engines(tiny_dir):
    """The model's own end-of-turn token stops a response on both engines; a response with no
    stop token within max_new_tokens is truncated."""
    from safedpo_ray.evaluate.decoding import finish_response, stop_token_ids, vllm_request, vllm_response
    from safedpo_ray.evaluate.generate import generate_batch

    tok = make_tokenizer(tiny_dir, chat=True, adds_bos=False)
    eot, eos = tok.convert_tokens_to_ids("<|eot|>"), tok.eos_token_id
    words = tok("Hello there friend", add_special_tokens=False)["input_ids"]
    gen = GenerationConfig(max_new_tokens=6)
    continuations = [words[:2] + [eot] + words[2:3],  # stops at the model's end-of-turn token
                     (words * 6)[:6],  # runs out of tokens: truncated
                     words[:1] + [eos]]  # stops at the tokenizer's EOS
    stub = RecordingModel(continuations, generation_eos=[eos, eot])
    out = generate_batch(stub, tok, PROMPTS, gen, max_prompt_length=MAX_PROMPT)
    assert list(stub.calls[0]["config"].eos_token_id) == [eos, eot]
    assert out[0] == {"response": tok.decode(words[:2]).strip(), "truncated": False}
    assert out[1]["truncated"] is True and out[2]["truncated"] is False

    stop = stop_token_ids(tok, [eos, eot])
    assert stop == [eos, eot]
    request = vllm_request({"prompt": PROMPTS[0], "prompt_ids": [1, 2]}, gen, stop)
    assert request["sampling_params"]["stop_token_ids"] == [eos, eot]
    assert request["sampling_params"]["max_tokens"] == 6 and request["sampling_params"]["temperature"] == 0.0
    for cont, hf in zip(continuations, out):
        # vLLM reports the ids it generated (the stop token included); the same function decodes them
        row = {"raw_prompt": "p", "prompt_id": "x", "generated_tokens": cont[: cont.index(eot) + 1] if eot in cont
               else cont[: cont.index(eos) + 1] if eos in cont else cont}
        got = vllm_response(row, tok, stop, gen.max_new_tokens, ["prompt_id", "prompt"])
        assert (got["response"], got["truncated"]) == (hf["response"], hf["truncated"])
    # a stop token vLLM leaves out of its ids still reads as finished (fewer than max tokens)
    assert finish_response(tok, words[:2], stop, 6) == (tok.decode(words[:2]).strip(), False)


def test_inputs_go_to_the_models_device(tiny_dir, monkeypatch):
    """Every generation path puts the prompt tensors on the model's device (meta stands in for a GPU)."""
    from safedpo_ray.evaluate import generate as generate_module
    from safedpo_ray.models.resolve import ModelSpec

    tok = make_tokenizer(tiny_dir, chat=False, adds_bos=False)
    gen = GenerationConfig(max_new_tokens=2, batch_size=2)
    conts = [[tok.eos_token_id]] * 3
    stub = RecordingModel(conts, device="meta")
    generate_module.generate_batch(stub, tok, PROMPTS, gen, max_prompt_length=MAX_PROMPT)
    assert stub.calls[-1]["device"].type == "meta"

    class Actor:  # HFGenerator with its model on the "GPU"
        def __init__(self, *args, **kwargs):
            self.device, self.tokenizer, self.model, self.stop_ids = "meta", tok, stub, [tok.eos_token_id]

    monkeypatch.setattr(generate_module, "HFGenerator", Actor)
    rows = [{"prompt_id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)]
    out = generate_module.generate_local(ModelSpec(label="m", path="/m"), rows, gen, max_prompt_length=MAX_PROMPT)
    assert len(out) == 3 and all(c["device"].type == "meta" for c in stub.calls)


def test_scorer_inputs_go_to_the_models_device(tiny_dir):
    from safedpo_ray.evaluate.scorers import Scorer

    tok = make_tokenizer(tiny_dir, chat=False, adds_bos=False)

    class StubScore(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))

        def forward(self, input_ids, attention_mask):
            assert input_ids.device.type == "meta" and attention_mask.device.type == "meta"
            return SimpleNamespace(end_scores=torch.zeros(input_ids.shape[0], 1))

    scorer = Scorer.__new__(Scorer)
    scorer.tokenizer, scorer.model, scorer.safe_rlhf, scorer.template, scorer.max_length = tok, StubScore(), True, "pku", 64
    assert scorer.score(["a", "b"], ["c", "d"]) == [0.0, 0.0]


def test_generation_defaults_do_not_cut_paper_length_answers():
    assert GenerationConfig().max_new_tokens == 512


def test_vllm_path_reads_the_models_stop_tokens(tmp_path):
    """The vLLM path has no loaded model: it reads generation_config.json, as the HF model does."""
    import json

    from safedpo_ray.evaluate.decoding import generation_eos, stop_token_ids

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert generation_eos(str(tmp_path)) == [7, 9] and generation_eos(str(tmp_path / "none")) is None
    assert stop_token_ids(SimpleNamespace(eos_token_id=9), generation_eos(str(tmp_path))) == [9, 7]
