"""How a process reads its share of a model dir (issue 14): tensors stored in chunks of at most
model_dir.CHUNK_BYTES, a slice read one block of chunks at a time (TensorStore decodes every
chunk a read touches, all at once), into memory the CPU backend takes without a copy."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from derta_jax.checkpoints import model_dir, names, resolve
from derta_jax.models.config import preset


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """A small random model dir stored in chunks of at most 2 KiB, and its tree."""
    cfg = preset("llama3-8b").replace(hidden_size=32, intermediate_size=48, num_layers=2,
                                      num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=96)
    rng = np.random.default_rng(0)
    params = {}
    for path, shape in names.canonical_shapes(cfg).items():
        names.set_leaf(params, path, rng.standard_normal(shape).astype(np.float32))
    out = tmp_path_factory.mktemp("chunked") / "model"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(model_dir, "CHUNK_BYTES", 2048)
        model_dir.save_model_dir(out, cfg, params, None)
    return out, params


class SpyView:
    """A TensorStore view that records the domain of every read made through it."""

    def __init__(self, view, reads):
        self.view, self.reads = view, reads

    def __getattr__(self, name):
        return getattr(self.view, name)

    def __getitem__(self, expr):
        return SpyView(self.view[expr], self.reads)

    def read(self):
        self.reads.append((tuple(self.view.domain.inclusive_min),
                           tuple(self.view.domain.exclusive_max)))
        return self.view.read()


def test_tensors_are_stored_in_chunks_of_at_most_chunk_bytes(chunked):
    out, params = chunked
    chunks = {}
    for zarray in (out / model_dir.PARAMS_DIR).glob("*/.zarray"):
        meta = json.loads(zarray.read_text())
        assert np.prod(meta["chunks"]) * 4 <= 2048, zarray.parent.name
        chunks[zarray.parent.name] = np.prod(meta["shape"]) // np.prod(meta["chunks"])
    assert chunks["embed_tokens.embedding"] >= 6 and chunks["lm_head.kernel"] >= 6
    restored = resolve.resolve_checkpoint(out).params_tree()  # the values are unchanged
    jax.tree.map(np.testing.assert_array_equal, restored, params)


@pytest.mark.parametrize("index, crosses", [
    ((slice(0, 96), slice(8, 16)), True),  # a shard's columns of row-chunked storage
    ((slice(10, 70), slice(None)), True),  # rows across chunk boundaries, not aligned to them
    ((slice(1, 2), slice(1, 3)), False),  # inside one chunk
], ids=["columns", "rows", "one chunk"])
@pytest.mark.parametrize("path", [("embed_tokens", "embedding"), ("lm_head", "kernel")])
def test_a_slice_is_read_one_block_of_chunks_at_a_time(chunked, path, index, crosses):
    out, params = chunked
    ckpt = resolve.resolve_checkpoint(out)
    stored = ckpt.params[path]
    store = resolve._open(ckpt.item_dir, ".".join(stored.leaf), ckpt.use_ocdbt, ckpt.use_zarr3)
    index = index if path[0] == "embed_tokens" else index[::-1]  # lm_head is [D, V]
    reads = []
    got = resolve._read_by_blocks(SpyView(store[index], reads))
    expected = params[path[0]][path[1]][index]
    np.testing.assert_array_equal(got, expected)
    assert got.ctypes.data % 64 == 0
    chunk = store.chunk_layout.read_chunk.shape

    def blocks(lo, hi, d):  # chunks a read from lo to hi crosses along axis d
        return (hi[d] - 1) // chunk[d] - lo[d] // chunk[d] + 1

    view = store[index].domain
    whole = [blocks(view.inclusive_min, view.exclusive_max, d) for d in range(2)]
    # One read per block of chunks along the axis the slice crosses most chunks of, each within
    # one chunk along that axis, together covering the slice once.
    assert len(reads) == max(whole)
    for lo, hi in reads:
        assert blocks(lo, hi, int(np.argmax(whole))) == 1, (lo, hi)
    assert sum(np.prod(np.subtract(hi, lo)) for lo, hi in reads) == expected.size
    assert (max(whole) > 1) == crosses


def test_read_tensors_are_placed_on_a_cpu_device_without_a_copy(chunked):
    out, params = chunked
    ckpt = resolve.resolve_checkpoint(out)
    array = ckpt.read_param(("layers_0", "mlp", "up_proj", "kernel"), (slice(0, 16),))
    assert array.ctypes.data % 64 == 0
    assert jax.device_put(array).unsafe_buffer_pointer() == array.ctypes.data
    cast = resolve._aligned(array, jax.numpy.bfloat16)
    assert cast.ctypes.data % 64 == 0 and cast.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(cast, array.astype(jax.numpy.bfloat16))
    assert resolve._aligned(array) is array
    mesh = jax.make_mesh((8,), ("fsdp",))
    placed = ckpt.on_devices(("embed_tokens", "embedding"), NamedSharding(mesh, P(None, "fsdp")))
    np.testing.assert_array_equal(np.asarray(placed), params["embed_tokens"]["embedding"])
    assert all(s.data.unsafe_buffer_pointer() % 64 == 0 for s in placed.addressable_shards)
