"""A LoRA training checkpoint (2 steps from a converted Hugging Face model, scan_layers, sharded
over 8 devices), exported merged and as a PEFT adapter, against our own forward and generation.

Our side is restored with Orbax's standard restore (not the exporter's per-tensor reader)."""
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch
import transformers

from derta_jax import convert, export
from derta_jax.evaluation.generation import generate
from derta_jax.models.decoder import Decoder
from derta_jax.models.layout import unstack_layers
from derta_jax.checkpoints.model_dir import load_config
from derta_jax.training import loop
from tests.export.helpers import hf_greedy
from tests.training.run_helpers import tiny_config

ARCH = dict(vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
            tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)
PROMPTS = [[128000, 40, 1097, 264, 1296], [128000, 9906, 11, 1268, 527, 499, 30, 358]]


@pytest.fixture(scope="module")
def run(tmp_path_factory, llama3_tokenizer_dir):
    """(original HF folder, training workdir) after 2 LoRA steps at a large learning rate."""
    tmp = tmp_path_factory.mktemp("lora_run")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**ARCH)).save_pretrained(tmp / "hf")
    model_dir = convert.main(["--hf", str(tmp / "hf"), "--out", str(tmp / "model"),
                              "--tokenizer", str(llama3_tokenizer_dir)])
    config = tiny_config(steps=2)
    config.model.init = "checkpoint"
    config.model.checkpoint = str(model_dir)
    config.model.lora_rank = 4
    config.model.scan_layers = True
    config.optimizer.learning_rate = 3e-2  # so that the adapters move the logits visibly
    config.checkpoint.every_steps = 1
    loop.train(config, tmp / "workdir")
    return tmp / "hf", tmp / "workdir"


def ours(workdir):
    """(cfg, params, lora) of step 2 in the canonical layout, via Orbax's whole-tree restore."""
    cfg = load_config(workdir / "model").replace(scan_layers=False)
    state = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / "2" / "state")
    return cfg, unstack_layers(state["params"]), unstack_layers(state["lora"])


def our_logits(cfg, params, lora, tokens):
    tokens = np.asarray(tokens, np.int32)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    variables = {"params": params, **({"lora": lora} if lora is not None else {})}
    logits, _ = Decoder(cfg).apply(variables, tokens, positions, np.ones_like(tokens))
    return np.asarray(logits)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def test_merged_export_matches_unmerged_forward_and_generation(run, tmp_path):
    _, workdir = run
    out = export.main(["--checkpoint", str(workdir), "--out", str(tmp_path / "merged"),
                       "--merge-lora"])
    cfg, params, lora = ours(workdir)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = [PROMPTS[1]]
    expected = our_logits(cfg, params, lora, tokens)
    base = our_logits(cfg.replace(lora_rank=0), params, None, tokens)
    assert np.abs(expected - base).max() > 1e-2  # the adapters matter at this tolerance
    np.testing.assert_allclose(hf_logits(merged, tokens), expected, atol=1e-4, rtol=0)
    for prompt in PROMPTS:
        [gen] = generate(params, cfg, [prompt], max_new_tokens=8, stop_ids=[], lora=lora,
                         progress=False)
        assert hf_greedy(merged, prompt, 8) == gen.token_ids


def test_peft_adapter_on_the_original_model_matches_merged_and_ours(run, tmp_path):
    hf_folder, workdir = run
    adapter = export.main(["--checkpoint", str(workdir), "--step", "2", "--out",
                           str(tmp_path / "adapter"), "--peft-adapter"])
    merged = export.main(["--checkpoint", str(workdir), "--out", str(tmp_path / "merged"),
                          "--merge-lora", "--dtype", "float32"])
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    cfg, params, lora = ours(workdir)
    tokens = [PROMPTS[1]]
    got = hf_logits(with_adapter, tokens)
    np.testing.assert_allclose(got, hf_logits(merged_model, tokens), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, our_logits(cfg, params, lora, tokens), atol=1e-4, rtol=0)
    with torch.no_grad():
        with with_adapter.disable_adapter():
            no_adapter = with_adapter(torch.tensor(tokens)).logits.numpy()
    assert np.abs(got - no_adapter).max() > 1e-2


def test_earlier_step_is_selectable(run, tmp_path):
    _, workdir = run
    step1 = export.main(["--checkpoint", str(workdir / "checkpoints" / "1"), "--out",
                         str(tmp_path / "s1"), "--peft-adapter"])
    step2 = export.main(["--checkpoint", str(workdir), "--out", str(tmp_path / "s2"),
                         "--peft-adapter"])
    one = peft.load_peft_weights(str(step1))
    two = peft.load_peft_weights(str(step2))
    assert one.keys() == two.keys() and len(one) == 2 * 7 * 2
    assert any(not torch.equal(one[k], two[k]) for k in one)
