"""training/loop.py load_params: a scanned run reads each layer of a model dir straight onto its
devices (every process only its shards; issue 14) and stacks them there; a start from a training
workdir places each tensor on its devices before reading the next."""
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding

from derta_jax.checkpoints import model_dir, resolve
from derta_jax.models import layout
from derta_jax.models.decoder import init_variables
from derta_jax.training import config as config_lib
from derta_jax.training import loop
from derta_jax.training import sharding as shd
from derta_jax.training import step as step_lib
from tests.training.run_helpers import tiny_config


def test_a_scanned_run_reads_each_layer_onto_its_devices_and_stacks_it_there(tmp_path,
                                                                           monkeypatch):
    config = tiny_config(1, mesh__data=1, mesh__fsdp=4, mesh__tensor=2, model__scan_layers=True)
    run = config_lib.parse(config)
    canonical = run.preset_model().replace(scan_layers=False)
    params = jax.device_get(init_variables(canonical, jax.random.PRNGKey(3))["params"])
    model_dir.save_model_dir(tmp_path / "model", canonical, params, None)
    config.model.init, config.model.checkpoint = "checkpoint", str(tmp_path / "model")
    run = config_lib.parse(config)
    cfg = run.model_config(model_dir.load_config(tmp_path / "model"))
    assert cfg.scan_layers
    mesh = shd.make_mesh(run.mesh)
    setup = step_lib.build(step_lib.StepConfig(cfg, run.loss, run.optimizer), mesh, 10)
    read_onto = []
    real_load = model_dir.load_model_dir

    def spy(path, dtype=None, shardings=None):
        read_onto.append(shardings)
        return real_load(path, dtype, shardings)

    monkeypatch.setattr(model_dir, "load_model_dir", spy)
    with mesh:
        loaded = loop.load_params(run, cfg, setup.shardings["params"])
    # Read: every tensor onto the mesh, each layer sharded as its slice of the stack.
    (onto,) = read_onto
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in jax.tree.leaves(onto))
    stacked = setup.shardings["params"]["layers"]
    for i in range(cfg.num_layers):
        jax.tree.map(lambda s, t: np.testing.assert_equal(tuple(s.spec), tuple(t.spec)[1:]),
                     onto[f"layers_{i}"], stacked)
    assert any(len(s.spec) > 1 and s.spec[1] is not None for s in jax.tree.leaves(stacked))
    # Stacked on device: the values of the model dir, on the step's shardings.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded),
                 layout.stack_layers(params))
    jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding.is_equivalent_to(s, x.ndim), True),
                 loaded, setup.shardings["params"])


def test_a_workdir_start_places_each_tensor_before_reading_the_next(base_run, monkeypatch):
    """Starting from a training workdir (the DPO baseline's vanilla run): each tensor is read,
    LoRA merged, and put on its devices before the next is read, so the host never holds the
    model; a scanned run stacks the layers on device."""
    config = tiny_config(1, mesh__data=1, mesh__fsdp=4, mesh__tensor=2, model__scan_layers=True,
                         model__init="checkpoint", model__checkpoint=str(base_run))
    run = config_lib.parse(config)
    start = loop.start_checkpoint(run)
    cfg = run.model_config(start.cfg)
    mesh = shd.make_mesh(run.mesh)
    setup = step_lib.build(step_lib.StepConfig(cfg, run.loss, run.optimizer), mesh, 10)
    events = []
    real_read, real_put = resolve.Checkpoint.merged_param, jax.device_put

    def read(self, path):
        events.append("read")
        return real_read(self, path)

    def put(x, sharding=None, **kw):
        events.append("put" if isinstance(x, np.ndarray) else "put a tree")
        return real_put(x, sharding, **kw)

    monkeypatch.setattr(resolve.Checkpoint, "merged_param", read)
    monkeypatch.setattr(jax, "device_put", put)
    with mesh:
        loaded = loop.load_params(run, cfg, setup.shardings["params"])
    monkeypatch.undo()
    assert events == ["read", "put"] * len(start.params)
    expected = traverse_util.unflatten_dict({p: start.merged_param(p) for p in start.params})
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded),
                 layout.stack_layers(expected))
    jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding.is_equivalent_to(s, x.ndim), True),
                 loaded, setup.shardings["params"])
