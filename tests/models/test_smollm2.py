"""The real SmolLM2-135M-Instruct (GGUF, dequantised to float32) vs transformers in PyTorch:
logits, greedy chat generation, tokenisation/chat template/stop ids, and the generate CLI."""
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from derta_jax import generate as generate_cli
from derta_jax.checkpoints.gguf import load_gguf
from derta_jax.checkpoints.model_dir import save_model_dir
from derta_jax.evaluation.generation import generate, left_pad
from derta_jax.evaluation.tasks import stop_ids
from derta_jax.models.decoder import Decoder

pytestmark = pytest.mark.slow

LOGIT_PROMPTS = ["The capital of France is", "def fibonacci(n):",
                 "Once upon a time, in a small village by the sea, there lived"]
CHAT_PROMPTS = ["How do I bake bread?", "What is 17 times 3?"]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_gguf(smollm2_gguf, progress=False)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def reference_chat(reference):
    """transformers' greedy generations (ids without the final eos) for the chat prompts."""
    model, tokenizer = reference
    out = []
    for prompt in CHAT_PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS)[0, ids.shape[1]:].tolist()
        out.append((ids[0].tolist(), gen))
    return out


def test_logits_match_transformers_with_left_padding(ours, reference):
    cfg, params, tokenizer = ours
    model, _ = reference
    rows = [tokenizer(p)["input_ids"] for p in LOGIT_PROMPTS]
    width = max(map(len, rows))
    tokens, positions, segments = left_pad(rows, width, len(rows))
    logits, _ = jax.jit(Decoder(cfg).apply)({"params": params}, tokens, positions, segments)
    for i, row in enumerate(rows):
        with torch.no_grad():
            ref = model(torch.tensor([row])).logits[0].numpy()
        got = np.asarray(logits[i, width - len(row):])
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 2e-5, LOGIT_PROMPTS[i]


def test_tokenisation_chat_template_and_stop_ids_match_transformers(ours, reference, reference_chat):
    cfg, _, tokenizer = ours
    _, hf_tokenizer = reference
    for prompt, (ids, _) in zip(CHAT_PROMPTS, reference_chat):
        assert generate_cli.encode(tokenizer, prompt, chat=True) == ids
        assert generate_cli.encode(tokenizer, prompt, chat=False) == hf_tokenizer(prompt)["input_ids"]
    assert tokenizer.decode(reference_chat[0][0]).startswith("<|im_start|>system\nYou are a helpful")
    assert hf_tokenizer.eos_token_id in stop_ids(cfg, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_ids(cfg, tokenizer)


def test_greedy_chat_generation_matches_transformers(ours, reference_chat, reference):
    cfg, params, tokenizer = ours
    stops = stop_ids(cfg, tokenizer)
    out = generate(params, cfg, [ids for ids, _ in reference_chat], max_new_tokens=NEW_TOKENS,
                   stop_ids=stops, batch_size=2, progress=False)
    for g, (_, ref) in zip(out, reference_chat):
        stopped = ref[-1] in stops
        assert g.token_ids == (ref[:-1] if stopped else ref)
        assert g.finish_reason == ("stop" if stopped else "length")


def test_generate_cli_on_a_model_dir(ours, reference_chat, reference, tmp_path):
    cfg, params, tokenizer = ours
    _, hf_tokenizer = reference
    save_model_dir(tmp_path / "model", cfg, params, tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in CHAT_PROMPTS))
    out = tmp_path / "out.jsonl"
    generate_cli.main(["--checkpoint", str(tmp_path / "model"), "--prompts", str(prompts),
                       "--out", str(out), "--max-new-tokens", str(NEW_TOKENS), "--chat"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row, prompt, (_, ref) in zip(rows, CHAT_PROMPTS, reference_chat):
        assert row["prompt"] == prompt
        assert row["response"] == hf_tokenizer.decode(ref, skip_special_tokens=True)
        assert row["num_tokens"] == len([t for t in ref if t != hf_tokenizer.eos_token_id])
        assert row["finish_reason"] in ("stop", "length")
