"""A full-parameter checkpoint after 2 steps of the tiny config (random init, tied embeddings,
sharded over 8 devices), exported and loaded in transformers: same logits as our model, restored
with Orbax's whole-tree restore, and the same greedy generation."""
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

from derta_jax import export
from derta_jax.checkpoints.model_dir import load_config
from derta_jax.evaluation.generation import generate
from derta_jax.models.decoder import Decoder
from derta_jax.training import loop
from tests.export.helpers import hf_greedy
from tests.training.run_helpers import tiny_config

PROMPTS = [[128000, 40, 1097, 264, 1296], [128000, 9906, 11, 1268, 527, 499, 30, 358, 1097]]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, llama3_tokenizer_dir):
    root = tmp_path_factory.mktemp("full_run") / "workdir"
    config = tiny_config(steps=2)
    config.checkpoint.every_steps = 2
    loop.train(config, root)
    return root


def test_export_matches_our_logits_and_greedy_generation(workdir, tmp_path):
    out = export.main(["--checkpoint", str(workdir), "--out", str(tmp_path / "hf"),
                       "--max-shard-size", "5MB"])
    assert len(list(out.glob("model-*.safetensors"))) > 1
    cfg = load_config(workdir / "model")
    assert not cfg.scan_layers and cfg.lora_rank == 0 and cfg.tie_word_embeddings
    state = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / "2" / "state")
    params = state["params"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.asarray([PROMPTS[1]], np.int32)
    positions = np.arange(tokens.shape[1])[None]
    ours, _ = Decoder(cfg).apply({"params": params}, tokens, positions, np.ones_like(tokens))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)
    for prompt in PROMPTS:
        [gen] = generate(params, cfg, [prompt], max_new_tokens=8, stop_ids=[], progress=False)
        assert hf_greedy(model, prompt, 8) == gen.token_ids
