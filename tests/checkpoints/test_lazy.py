"""Reading a tensor for convert: mapped from its file and laid out a slab at a time."""
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from derta_jax.checkpoints import safetensors_io
from derta_jax.checkpoints.names import copy_in_slabs, release_pages

LAYOUTS = {  # the layout changes of names.py, on a [12, 10] (or [3, 4, 10]) source
    "same": lambda x: x,
    "transpose": lambda x: x.T,
    "split out heads": lambda x: x.T.reshape(10, 3, 4),
    "split in heads": lambda x: x.T.reshape(5, 2, 12),
    "experts": lambda x: x.reshape(3, 4, 10).transpose(0, 2, 1),
    "half of fused": lambda x: x.reshape(3, 4, 10)[:, 2:4, :].transpose(0, 2, 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slabs_of_a_mapped_source_equal_the_whole_layout(layout, dtype, tmp_path):
    x = np.random.default_rng(0).standard_normal((12, 10)).astype(np.float32)
    x.tofile(tmp_path / "x")
    mapped = np.memmap(tmp_path / "x", np.float32, mode="r", shape=x.shape)
    view, expected = LAYOUTS[layout](mapped), LAYOUTS[layout](x)
    out = np.empty(expected.shape, jnp.dtype(dtype))
    releases = []
    release = release_pages(mapped)
    copy_in_slabs(out, view, lambda: (releases.append(1), release()), slab_bytes=64)
    np.testing.assert_array_equal(out, expected.astype(jnp.dtype(dtype)))
    assert len(releases) > 1  # several slabs, the pages dropped after each


def test_read_tensor_maps_what_safe_open_reads_and_refuses_other_dtypes(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
               "f16": rng.standard_normal((4,)).astype(np.float16),
               "bf16": rng.standard_normal((2, 3)).astype(jnp.bfloat16),
               "scalar": np.array(2.5, np.float32), "ids": np.arange(4, dtype=np.int64)}
    save_file(tensors, tmp_path / "m.safetensors")
    found = safetensors_io.read_shapes([tmp_path / "m.safetensors"])
    with safe_open(tmp_path / "m.safetensors", framework="numpy") as f:
        for name in ("f32", "f16", "bf16", "scalar"):
            got = safetensors_io.read_tensor(tmp_path, found, name)
            assert got.dtype == tensors[name].dtype and got.shape == tensors[name].shape
            np.testing.assert_array_equal(got, f.get_tensor(name))
    with pytest.raises(ValueError, match="'ids' .* has dtype I64; weights must be one of"):
        safetensors_io.read_tensor(tmp_path, found, "ids")


def test_read_tensor_of_a_file_cut_after_its_header_was_read_names_it(tmp_path):
    save_file({"w": np.ones((64, 64), np.float32)}, tmp_path / "m.safetensors")
    found = safetensors_io.read_shapes([tmp_path / "m.safetensors"])
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"tensor 'w' in .*m.safetensors: .* \(truncated\?\)"):
        safetensors_io.read_tensor(tmp_path, found, "w")
