"""load_gguf: SmolLM2's Q4_1 file gives exactly the tensors transformers' GGUF loader gives."""
import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from derta_jax.checkpoints.gguf import load_gguf, unpermute_rope_rows
from derta_jax.checkpoints.names import hf_tensor_specs
from derta_jax.models.config import preset


def llama_cpp_permute(w, n_heads):
    """The permutation llama.cpp's convert_hf_to_gguf.py applies to q/k rows, written out."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp(n_heads):
    w = np.arange(n_heads * 8 * 5, dtype=np.float32).reshape(n_heads * 8, 5)
    assert not np.array_equal(llama_cpp_permute(w, n_heads), w)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, n_heads), n_heads), w)


@pytest.fixture(scope="module")
def both(smollm2_gguf):
    ours = load_gguf(smollm2_gguf, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32)
    return ours, hf


@pytest.mark.slow
def test_tensors_equal_transformers_gguf_loader(both):
    (cfg, params, _), hf = both
    state = hf.state_dict()
    specs = hf_tensor_specs(cfg)
    assert set(state) - set(specs) == {"lm_head.weight"}  # tied: transformers' copy of the embedding
    n = 0
    for name, spec in specs.items():
        for path, to_canonical in spec.outputs:
            leaf = params
            for key in path:
                leaf = leaf[key]
            np.testing.assert_array_equal(leaf, to_canonical(state[name].numpy()), err_msg=name)
            n += 1
    assert n == len(jax.tree.leaves(params)) == 2 + 30 * 9


@pytest.mark.slow
def test_config_and_tokenizer_from_metadata_match_transformers(both):
    (cfg, _, tokenizer), hf = both
    c = hf.config
    assert cfg == preset("smollm2-135m", rms_norm_eps=cfg.rms_norm_eps)
    assert cfg.rms_norm_eps == pytest.approx(c.rms_norm_eps) == pytest.approx(1e-5)
    assert (cfg.rope_theta, cfg.tie_word_embeddings) == (c.rope_parameters["rope_theta"], c.tie_word_embeddings)
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (c.bos_token_id, (c.eos_token_id,))
    assert tokenizer("Sorry", add_special_tokens=False)["input_ids"] == [37388]
    assert tokenizer.chat_template and "You are a helpful AI assistant named SmolLM" in tokenizer.chat_template
