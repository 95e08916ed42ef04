"""training/loop.py load_params: a start from a model dir or a training workdir reads each tensor
as the slices its devices hold, one tensor after the other (every process only its shards;
issue 14), and a scanned run's stacks are filled on their shards layer by layer."""
import jax
import pytest
import numpy as np
from flax import traverse_util

from derta_jax.checkpoints import model_dir, resolve
from derta_jax.models import layout
from derta_jax.models.decoder import init_variables
from derta_jax.training import config as config_lib
from derta_jax.training import loop
from derta_jax.training import sharding as shd
from derta_jax.training import step as step_lib
from tests.training.run_helpers import tiny_config


@pytest.fixture
def model_dir_start(tmp_path):
    """A model dir of tiny_config's model with random weights."""
    canonical = config_lib.parse(tiny_config(1)).preset_model().replace(scan_layers=False)
    params = jax.device_get(init_variables(canonical, jax.random.PRNGKey(3))["params"])
    return model_dir.save_model_dir(tmp_path / "model", canonical, params, None)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan_layers", "layers"])
@pytest.mark.parametrize("source", ["model dir", "training workdir"])
def test_a_start_reads_each_tensor_as_its_devices_slices(source, scan_layers, request,
                                                         monkeypatch):
    """From a model dir (convert's output) or a training workdir (the DPO baseline's vanilla
    run): one tensor at a time, each read only as the distinct slices its devices hold (a process
    reads its share, never a whole sharded tensor); a scanned run fills each stacked tensor's
    shards layer by layer, with no unstacked copy."""
    start = request.getfixturevalue("model_dir_start" if source == "model dir" else "base_run")
    config = tiny_config(1, mesh__data=1, mesh__fsdp=4, mesh__tensor=2,
                         model__scan_layers=scan_layers, model__init="checkpoint",
                         model__checkpoint=str(start))
    run = config_lib.parse(config)
    ckpt = resolve.resolve_checkpoint(start)
    cfg = run.model_config(ckpt.cfg)
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
    assert {p for p, _ in reads} == set(ckpt.params)  # every tensor ...
    assert len(reads) == len(set(reads))  # ... each slice once (two devices may share one)
    shardings = traverse_util.flatten_dict(setup.shardings["params"])
    for path, stored in ckpt.params.items():
        stacked = scan_layers and path[0].startswith("layers_")
        sharding = shardings[("layers",) + path[1:]] if stacked else shardings[path]
        held = sharding.addressable_devices_indices_map(
            ((cfg.num_layers,) if stacked else ()) + stored.shape).values()
        slices = {tuple((s.start, s.stop) for s in (i[1:] if stacked else i)) for i in held}
        assert {i for p, i in reads if p == path} == slices, path
    assert any(len({i for p, i in reads if p == path}) == 8 for path in ckpt.params)
    expected = ckpt.params_tree()  # read whole
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded),
                 layout.stack_layers(expected) if scan_layers else expected)
    jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding.is_equivalent_to(s, x.ndim), True),
                 loaded, setup.shardings["params"])
