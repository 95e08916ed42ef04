"""Model dir round trip (Orbax params, model_config.json, tokenizer, read back through
resolve.py), casting and sharding on the way back."""
import dataclasses
import weakref

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from transformers import AutoTokenizer

from derta_jax.checkpoints.hf import lazy_hf, load_hf
from derta_jax.checkpoints.model_dir import load_config, load_tokenizer, save_model_dir
from derta_jax.checkpoints.resolve import resolve_checkpoint


@pytest.fixture(scope="module")
def saved(hf_checkpoint, llama3_tokenizer_dir, tmp_path_factory):
    folder, _ = hf_checkpoint("mixtral")
    cfg, params = load_hf(folder, progress=False)
    out = save_model_dir(tmp_path_factory.mktemp("md") / "model", cfg, params,
                         AutoTokenizer.from_pretrained(llama3_tokenizer_dir))
    return out, cfg, params


def test_restore_gives_the_saved_config_params_and_tokenizer(saved):
    out, cfg, params = saved
    ckpt = resolve_checkpoint(out)
    assert ckpt.cfg == cfg == load_config(out)
    params2 = ckpt.params_tree()
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert load_tokenizer(out)("Sorry", add_special_tokens=False)["input_ids"] == [19701]


def test_restore_casts_and_shards(saved):
    out, cfg, params = saved
    mesh = jax.make_mesh((8,), ("fsdp",))
    shardings = jax.tree.map(
        lambda x: NamedSharding(mesh, P("fsdp") if x.shape[0] % 8 == 0 else P()), params)
    path = ("embed_tokens", "embedding")
    embed = resolve_checkpoint(out).on_devices(path, shardings[path[0]][path[1]],
                                               jax.numpy.bfloat16)
    assert embed.dtype == jax.numpy.bfloat16 and embed.sharding == shardings["embed_tokens"]["embedding"]
    assert len(embed.addressable_shards) == 8 and embed.addressable_shards[0].data.shape[0] == 96 // 8
    np.testing.assert_array_equal(np.asarray(embed, np.float32),
                                  params["embed_tokens"]["embedding"].astype(jax.numpy.bfloat16).astype(np.float32))


def test_not_a_model_dir_says_what_is_missing(saved, tmp_path):
    with pytest.raises(ValueError, match="model_config.json is missing"):
        load_config(tmp_path)
    out, cfg, _ = saved
    save_model_dir(tmp_path / "no_params", cfg, None, None)
    with pytest.raises(ValueError, match="model dir without params/"):
        resolve_checkpoint(tmp_path / "no_params")
    with pytest.raises(ValueError, match="no_params has no tokenizer files"):
        load_tokenizer(tmp_path / "no_params")


def test_refuses_to_overwrite_params(saved):
    out, cfg, params = saved
    with pytest.raises(ValueError, match="params already exists"):
        save_model_dir(out, cfg, params, None)


def test_lazy_leaves_are_read_and_written_one_at_a_time(saved, hf_checkpoint, tmp_path):
    """What convert relies on: a LazyTensor is read only when Orbax writes it, and no other
    leaf's array is alive meanwhile. The stored result is what the eager tree stores."""
    _, _, params = saved
    folder, _ = hf_checkpoint("mixtral")  # stacked experts: one leaf from several tensors
    lazy_cfg, lazy = lazy_hf(folder, progress=False)
    live, most, reads = set(), [0], []

    def tracked(leaf):
        def read():
            array = leaf.read()
            reads.append(leaf.shape)
            live.add(len(reads))
            weakref.finalize(array, live.discard, len(reads))
            most[0] = max(most[0], len(live))
            return array
        return dataclasses.replace(leaf, read=read)

    lazy = jax.tree.map(tracked, lazy)
    assert not reads  # building the tree reads nothing
    save_model_dir(tmp_path / "lazy", lazy_cfg, lazy, None)
    assert len(reads) == len(jax.tree.leaves(params)) and most[0] == 1
    assert not live  # nothing is kept once written
    restored = resolve_checkpoint(tmp_path / "lazy").params_tree()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
