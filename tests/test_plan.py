"""derta_jax/plan.py: the AOT memory plan agrees with what the real step allocates, says when a
config does not fit, and compiles for a TPU slice with XLA's TPU compiler when libtpu is there."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from derta_jax import plan as plan_lib
from derta_jax.training import config as config_lib
from tests.conftest import ROOT, run_module

TPU_PYTHON = ROOT / ".venv-tpu" / "bin" / "python"


PROBE = """
import json, sys
import jax, numpy as np
import flax.linen as nn
from derta_jax import plan as plan_lib
from derta_jax.training import config as config_lib, sharding as shd, step as step_lib
from tests.training.run_helpers import tiny_config

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

config = tiny_config(2)
config.data.max_length, config.train.batch_size = 256, 16
p = plan_lib.plan(config, plan_lib.target("cpu-8"))
run = config_lib.parse(config)
mesh = shd.make_mesh(run.mesh)
setup = step_lib.build(step_lib.StepConfig(run.model_config(run.preset_model()), run.loss,
                                           run.optimizer), mesh, 10)
rows, length = p["batch"]["rows"], p["batch"]["length"]
ones = np.ones((rows, length), np.int32)
batch = shd.shard_batch({"tokens": ones, "targets": ones, "loss_mask": ones.astype(bool),
                         "rto_mask": np.zeros((rows, length), bool), "segment_ids": ones,
                         "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1))}, mesh)
rng = jax.device_put(jax.random.PRNGKey(1), shd.replicated(mesh))
state = jax.block_until_ready(setup.init(jax.random.PRNGKey(0)))
dev0 = jax.devices()[0]
on_dev0 = sum(s.data.nbytes for x in jax.tree.leaves((state, batch, rng))
              for s in x.addressable_shards if s.device == dev0)
with mesh, nn.logical_axis_rules(shd.LOGICAL_RULES):  # the step as training jits it
    step = setup.step_fn.lower(state, batch, rng).compile()
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS (VmHWM) back to the current RSS
jax.block_until_ready(step(state, batch, rng))
grown = (status("VmHWM") - before) / len(jax.devices())
print(json.dumps({"plan": p, "on_dev0": on_dev0, "grown": grown}))
"""


def test_the_cpu_plan_agrees_with_the_memory_the_step_allocates():
    """In a fresh process (freed memory would hide the growth): the plan's per-device argument
    bytes are the state + batch shards really on device 0, and its outputs + temporaries are
    the peak RSS growth of one step per device (the peak reset after compiling) within -10% /
    +30% (measured 2026-12-02: +11%)."""
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    p, mem = out["plan"], out["plan"]["per_device_bytes"]
    assert (p["batch"]["rows"], p["batch"]["length"]) == (16, 256)
    assert out["on_dev0"] == pytest.approx(mem["arguments"], rel=0.01)
    planned = mem["outputs"] - mem["aliased"] + mem["temporaries"]
    assert 0.9 * planned <= out["grown"] <= 1.3 * planned, (out["grown"], planned)


def test_a_config_that_cannot_fit_says_so_with_exit_code_1(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_module("derta_jax.plan", f"--config={ROOT}/configs/tiny.py", "--topology",
                      "cpu-8", "--memory_gib", "0.05", "--json", str(out))
    assert proc.returncode == 1, proc.stderr
    assert "DOES NOT FIT" in proc.stdout and "mesh: data 8 x fsdp 1 x tensor 1" in proc.stdout
    written = json.loads(out.read_text())
    assert written["fits"] is False and written["device_memory_bytes"] == int(0.05 * 1024 ** 3)
    assert written["per_device_bytes"]["total"] > written["device_memory_bytes"]


@pytest.mark.parametrize("args, message", [
    (["--topology", "v9-8"], "error: --topology='v9-8': expected one of v4-8, "),
    (["--topology", "cpu-8", "--config.mesh.data=3"], "error: mesh: data*fsdp*tensor = 3 but "
                                                       "there are 8 devices"),
    (["--topology", "cpu-8", "--rows", "3"], "error: --rows=3: expected a multiple of 8"),
])
def test_user_errors_are_one_line(args, message):
    proc = run_module("derta_jax.plan", f"--config={ROOT}/configs/tiny.py", *args)
    assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None,
                    reason="this environment has libtpu")
def test_a_tpu_slice_without_libtpu_says_how_to_get_it():
    proc = run_module("derta_jax.plan", f"--config={ROOT}/configs/tiny.py", "--topology", "v5p-8")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --topology=v5p-8 needs libtpu for XLA's TPU compiler: "
                                  "run `bash scripts/setup.sh --tpu`"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_paper_config_plans_without_its_weights():
    """The paper configs name their architecture (model.preset), so a plan needs no model dir."""
    for name, arg in (("llama3", "8b"), ("llama3", "70b_lora"), ("mixtral", "8x7b"),
                      ("mistral", "7b")):
        config = config_lib.parse(_config(name, arg))
        assert not (ROOT / config.source.checkpoint).exists()
        assert plan_lib.architecture(config).num_layers >= 32


def _config(name, arg):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.skipif(not TPU_PYTHON.exists(), reason="no .venv-tpu (bash scripts/setup.sh --tpu)")
def test_a_tpu_slice_compiles_with_the_tpu_compiler(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([str(TPU_PYTHON), "-m", "derta_jax.plan",
                           f"--config={ROOT}/configs/tiny.py", "--topology", "v5p-8",
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    p = json.loads(out.read_text())
    assert p["compiler"] == "XLA's TPU compiler (libtpu)" and p["devices"] == 4
    assert p["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and p["fits"]
    assert p["per_device_bytes"]["arguments"] > 0 and p["xla_flops_per_device"] > 0


def test_a_step_the_tpu_compiler_refuses_is_reported_as_not_fitting():
    """libtpu refuses to compile a step whose temporaries exceed HBM (Mixtral LoRA on v5p-64
    before train.accum_steps=2): the plan takes the temporaries from its message and the
    arguments from the shardings; any other compile error is raised."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.sharding.Mesh(jax.devices()[:8], ("fsdp",))
    weights = jax.ShapeDtypeStruct((1024, 64), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    error = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (107.86G) exceeds available HBM (95.74G).")
    mem = plan_lib._refused(error, {"w": weights, "step": scalar})
    assert mem["temporaries"] == int(107.86 * 1024 ** 3)
    assert mem["arguments"] == mem["aliased"] == 1024 * 64 * 4 // 8 + 4
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        plan_lib._refused(jax.errors.JaxRuntimeError("INTERNAL: something else"), {})


def test_the_module_imports_beside_other_entry_points_that_define_config():
    """Its flags are defined when the command line runs, not at import (CI collected this file
    in a worker that had imported derta_jax.data.inspect: DuplicateFlagError)."""
    import derta_jax.data.inspect  # noqa: F401  (defines --config)
    importlib.reload(plan_lib)
