"""Generation over the 8 fake CPU devices equals generation on one device."""
import jax
import pytest
from jax.sharding import NamedSharding

from derta_jax.evaluation import generation
from derta_jax.evaluation.generation import generate
from derta_jax.evaluation.loading import parse_mesh
from derta_jax.models.config import ModelConfig
from derta_jax.models.decoder import init_variables
from derta_jax.training.sharding import MeshConfig, make_mesh

# vocab, heads and kv heads divisible by 2 so that a (2, 2, 2) mesh really splits the weights.
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,))
PROMPTS = [[5, 9, 11], [7], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24], [30, 31]]
NEW = 8


@pytest.fixture(scope="module")
def params():
    return init_variables(CFG, jax.random.key(0))["params"]


@pytest.fixture(scope="module")
def one_device(params):
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    return generate(params, CFG, PROMPTS, max_new_tokens=NEW, stop_ids=[], batch_size=4,
                    progress=False, mesh=mesh)


def test_eight_devices_exist():
    assert jax.device_count() == 8  # tests/conftest.py; otherwise this file tests nothing


def test_data_parallel_equals_one_device(params, one_device):
    # Default mesh: all 8 devices on the data axis; 5 prompts at batch_size 4 -> batches of 8 rows.
    out = generate(params, CFG, PROMPTS, max_new_tokens=NEW, stop_ids=[], batch_size=4,
                   progress=False)
    assert out == one_device
    assert generation._batch_rows(5, 4, make_mesh(MeshConfig())) == 8


def test_fsdp_and_tensor_sharded_params_equal_one_device(params, one_device):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = generation.param_shardings(CFG, mesh)["params"]
    q_spec = shardings["layers_0"]["attn"]["q_proj"]["kernel"].spec
    assert tuple(q_spec) == ("fsdp", "tensor", None)  # [embed, heads, head_dim]: really split
    placed = jax.device_put(params, shardings)
    out = generate(placed, CFG, PROMPTS, max_new_tokens=NEW, stop_ids=[3, 4], batch_size=4,
                   progress=False)  # the mesh is taken from the placed params
    reference = generate(params, CFG, PROMPTS, max_new_tokens=NEW, stop_ids=[3, 4], batch_size=4,
                         progress=False, mesh=make_mesh(MeshConfig(), jax.devices()[:1]))
    assert out == reference
    # Stop ids only shorten the answers of the same greedy run.
    for got, full in zip(out, one_device):
        assert got.token_ids == full.token_ids[:len(got.token_ids)]


def test_default_mesh_follows_the_params(params):
    mesh = make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))
    placed = jax.device_put(params, generation.param_shardings(CFG, mesh)["params"])
    assert generation.default_mesh(placed) == mesh
    assert generation.default_mesh(params).devices.size == 8
    leaf = jax.tree.leaves(placed)[0]
    assert isinstance(leaf.sharding, NamedSharding)


def test_batch_rows_round_up_to_the_data_parallel_size():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert [generation._batch_rows(n, 16, mesh) for n in (1, 3, 5, 40)] == [4, 4, 8, 16]
    assert generation._batch_rows(40, 6, mesh) == 8
    assert generation._batch_rows(3, 16, make_mesh(MeshConfig(), jax.devices()[:1])) == 4


def test_mesh_flag_takes_three_sizes_one_may_be_minus_one():
    assert dict(parse_mesh(None).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(parse_mesh("-1,1,2").shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match=r"--mesh '2,2': expected three integers"):
        parse_mesh("2,2")
    with pytest.raises(ValueError, match=r"--mesh 'a,b,c'"):
        parse_mesh("a,b,c")
    with pytest.raises(ValueError, match="data\\*fsdp\\*tensor = 3"):
        parse_mesh("3,1,1")
