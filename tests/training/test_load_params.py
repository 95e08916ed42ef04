"""training/loop.py load_params: a scanned run reads each layer of a model dir straight onto its
devices (every process only its shards; issue 14) and stacks them there; a start from a training
workdir reads each tensor as the slices its devices hold, one tensor after the other."""
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


def test_a_workdir_start_reads_each_tensor_as_its_devices_slices(base_run, monkeypatch):
    """Starting from a training workdir (the DPO baseline's vanilla run): one tensor at a time,
    each read only as the distinct slices its devices hold (a process reads its share, never a
    whole sharded tensor); a scanned run stacks the layers on device."""
    config = tiny_config(1, mesh__data=1, mesh__fsdp=4, mesh__tensor=2, model__scan_layers=True,
                         model__init="checkpoint", model__checkpoint=str(base_run))
    run = config_lib.parse(config)
    start = loop.start_checkpoint(run)
    cfg = run.model_config(start.cfg)
    mesh = shd.make_mesh(run.mesh)
    setup = step_lib.build(step_lib.StepConfig(cfg, run.loss, run.optimizer), mesh, 10)
    reads = []
    real_read = resolve.Checkpoint.read_param

    def read(self, path, index=()):
        reads.append((path, tuple((s.start, s.stop) for s in index)))
        return real_read(self, path, index)

    monkeypatch.setattr(resolve.Checkpoint, "read_param", read)
    with mesh:
        loaded = loop.load_params(run, cfg, setup.shardings["params"])
    monkeypatch.undo()
    order = [p for i, (p, _) in enumerate(reads) if i == 0 or reads[i - 1][0] != p]
    assert sorted(order) == sorted(start.params)  # each tensor's reads together, every tensor once
    assert len(reads) == len(set(reads))  # a slice two devices share is read once
    onto = traverse_util.flatten_dict(loop.layer_shardings(setup.shardings["params"],
                                                           cfg.num_layers))
    for path, stored in start.params.items():
        slices = {tuple((s.start, s.stop) for s in i)
                  for i in onto[path].addressable_devices_indices_map(stored.shape).values()}
        assert {i for p, i in reads if p == path} == slices, path
    assert any(len(slices) == 8 for slices in
               ({i for p, i in reads if p == path} for path in start.params))
    expected = start.params_tree()  # read whole
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded),
                 layout.stack_layers(expected))
    jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding.is_equivalent_to(s, x.ndim), True),
                 loaded, setup.shardings["params"])
