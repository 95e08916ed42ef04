"""Will it fit? The real train step compiled ahead of time for a target, before anyone pays for it.

    python -m derta_jax.plan --config=configs/llama3.py:70b_lora --topology v5p-64 [--json F]

Builds the step exactly as training does (training/step.py `build`: same shardings, remat, scan,
LoRA, optimizer, batch rows and length) on abstract `ShapeDtypeStruct`s carrying their
`NamedSharding`s, so nothing of the model is allocated, compiles it with XLA, and prints per
device the argument, output and temporary bytes and their sum against the chip's memory, the
compile time, XLA's FLOP count and the model's FLOPs per step (training/perf.py) with the step
time they imply at `--mfu`.

Targets (`TARGETS`): Cloud TPU accelerator types (v4-32, v5p-64, ...) are compiled by XLA's own
TPU compiler, which runs on this CPU machine with libtpu installed (`bash scripts/setup.sh --tpu`
makes .venv-tpu; run `.venv-tpu/bin/python -m derta_jax.plan ...`). GPU targets (h100-8: one node
of 8 x H100 80 GB, h100-16: two) cannot be compiled without the GPUs: they are compiled by XLA:CPU
on as many fake CPU devices with the same mesh and labelled estimates (GPU fusion, kernels and
collectives differ). `cpu-N` plans for N fake CPU devices (tests), with `--memory_gib` per device.

The batch is the most rows a step of the run can take: train.batch_size examples one per row,
rounded up to the multiple the loop uses (training/loop.py make_plan); packing only lowers it
(`--rows` sets it, e.g. from a run's plan.json). A step that the TPU compiler refuses for lack
of memory does not fit: the plan reports the temporaries the compiler asked for. Exit code 0 when
it fits, 1 when it does not, 2 on a user error.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from derta_jax import cli, storage

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    kind: str  # tpu | gpu | cpu
    devices: int  # JAX devices (a TPU v4/v5p chip is one device, its two cores run as one)
    memory: int  # bytes of device memory per device
    peak_flops: float  # dense bf16 FLOP/s per device (vendor figure); 0 = unknown
    devices_per_host: int
    topology: str = ""  # XLA's TPU topology name
    chip_config: str = "megacore"

    @property
    def compiler(self) -> str:
        return ("XLA's TPU compiler (libtpu)" if self.kind == "tpu" else
                f"XLA:CPU on {self.devices} fake CPU devices" +
                (": an estimate for the GPUs" if self.kind == "gpu" else ""))


def _tpu(name: str, topology: str, devices: int, memory_gib: float, peak_tflops: float,
         chip_config: str = "megacore") -> Target:
    return Target(name, "tpu", devices, int(memory_gib * GIB), peak_tflops * 1e12, 4, topology,
                  chip_config)


# Accelerator types as Cloud TPU names them (v4 and v5p count TensorCores, two per chip; v5e and
# v6e count chips); HBM per chip and bf16 peak from Google's system-architecture pages.
TARGETS = {t.name: t for t in (
    _tpu("v4-8", "v4:2x2x1", 4, 32, 275), _tpu("v4-32", "v4:2x2x4", 16, 32, 275),
    _tpu("v4-128", "v4:4x4x4", 64, 32, 275),
    _tpu("v5p-8", "v5:2x2x1", 4, 95, 459), _tpu("v5p-64", "v5:2x4x4", 32, 95, 459),
    _tpu("v5p-128", "v5:4x4x4", 64, 95, 459), _tpu("v5p-256", "v5:4x4x8", 128, 95, 459),
    _tpu("v5e-16", "v5e:4x4", 16, 16, 197, "default"),
    _tpu("v5e-256", "v5e:16x16", 256, 16, 197, "default"),
    _tpu("v6e-64", "v6e:8x8", 64, 32, 918, "default"),
    Target("h100-8", "gpu", 8, 80 * GIB, 989e12, 8),
    Target("h100-16", "gpu", 16, 80 * GIB, 989e12, 8),
)}


def target(name: str, memory_gib: float = 0.0) -> Target:
    """A known target, or cpu-N; `memory_gib` > 0 replaces its memory per device."""
    if name in TARGETS:
        t = TARGETS[name]
    elif name.startswith("cpu-") and name[4:].isdigit() and int(name[4:]) >= 1:
        n = int(name[4:])
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        t = Target(name, "cpu", n, ram // n, 0.0, n)
    else:
        raise ValueError(f"--topology={name!r}: expected one of {', '.join(TARGETS)} or cpu-N")
    return dataclasses.replace(t, memory=int(memory_gib * GIB)) if memory_gib > 0 else t


def use_fake_cpu_devices(t: Target) -> None:
    """Before JAX starts: enough fake CPU devices for a GPU or CPU target; only the CPU backend."""
    import jax
    jax.config.update("jax_platforms", "cpu")  # libtpu's TPU compiler needs no TPU backend
    if t.kind != "tpu":
        flag = f"--xla_force_host_platform_device_count={t.devices}"
        os.environ["XLA_FLAGS"] = " ".join(
            [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")] + [flag])


def devices(t: Target) -> list[Any]:
    import jax
    if t.kind == "tpu":
        try:
            from jax.experimental import topologies
            desc = topologies.get_topology_desc(
                platform="tpu", topology_name=t.topology, chip_config_name=t.chip_config,
                chips_per_host_bounds=(2, 2, 1), num_slices=1)
        except Exception as e:  # no libtpu: jax says the TPU backend is missing
            raise ValueError(f"--topology={t.name} needs libtpu for XLA's TPU compiler: run "
                             "`bash scripts/setup.sh --tpu`, then `.venv-tpu/bin/python -m "
                             f"derta_jax.plan ...` ({type(e).__name__}: {e})") from None
        return list(desc.devices)
    found = jax.devices("cpu")
    if len(found) < t.devices:
        raise ValueError(f"--topology={t.name} needs {t.devices} CPU devices but JAX has "
                         f"{len(found)} (XLA_FLAGS was set after JAX started)")
    return found[:t.devices]


def architecture(run: Any) -> Any:
    """The model.checkpoint's architecture when it exists, else model.preset (+ arch_overrides)."""
    from derta_jax.checkpoints import model_dir, resolve
    ckpt = storage.path(run.source.checkpoint) if run.source.checkpoint else None
    for folder in (ckpt, ckpt / resolve.WORKDIR_MODEL) if ckpt is not None else ():
        if (folder / model_dir.CONFIG_FILE).is_file():  # a model dir, or a training workdir's
            return model_dir.load_config(folder)
    if run.source.preset:
        return run.preset_model()
    raise ValueError(f"model.checkpoint={run.source.checkpoint!r} holds no model_config.json: set "
                     "--config.model.preset=<name> to plan that architecture without the weights")


def plan(config: Any, t: Target, rows: int = 0, mfu: float = 0.4) -> dict[str, Any]:
    """Compiles the run's train step for `t` (abstract arguments only) and reports its memory
    per device, FLOPs and compile time."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from derta_jax.training import config as config_lib
    from derta_jax.training import loop
    from derta_jax.training import perf
    from derta_jax.training import sharding as shd
    from derta_jax.training import step as step_lib

    run = config_lib.parse(config)
    cfg = run.model_config(architecture(run))
    mesh = shd.make_mesh(run.mesh, devices(t))
    tr = run.train
    processes = max(1, t.devices // t.devices_per_host)
    multiple = loop.row_multiple(mesh, tr.accum_steps, processes)
    rows = rows or -(-tr.batch_size // multiple) * multiple
    if rows % multiple:
        raise ValueError(f"--rows={rows}: expected a multiple of {multiple} (data x fsdp shards, "
                         "train.accum_steps and hosts)")
    length = run.data.max_length
    setup = step_lib.build(loop.step_config(run, cfg), mesh, total_steps=1000)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         setup.abstract, setup.shardings)
    dtypes = {"ref_logps": jnp.float32, "loss_mask": jnp.bool_, "rto_mask": jnp.bool_}
    batch = {k: jax.ShapeDtypeStruct((rows, length), dtypes.get(k, jnp.int32),
                                     sharding=shd.batch_sharding(mesh))
             for k in step_lib.batch_keys(setup.cfg)}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shd.replicated(mesh))
    start = time.perf_counter()
    with mesh, nn.logical_axis_rules(shd.LOGICAL_RULES):
        try:
            compiled = setup.step_fn.lower(state, batch, rng).compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what cannot fit
            compiled, refused = None, _refused(e, (state, batch, rng))
    compile_s = time.perf_counter() - start
    if compiled is not None:
        m = compiled.memory_analysis()
        mem = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
               "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    else:
        mem, cost = refused, {}
    mem["total"] = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
    model_flops = perf.train_flops_per_token(cfg, length) * rows * length
    step_s = model_flops / (t.devices * t.peak_flops * mfu) if t.peak_flops > 0 else None
    trainable = "lora" if cfg.lora_rank > 0 else "params"
    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(setup.abstract["params"]))
    n_trainable = sum(math.prod(a.shape) for a in jax.tree.leaves(setup.abstract[trainable]))
    return {
        "target": t.name, "compiler": t.compiler, "devices": t.devices,
        "device_memory_bytes": t.memory, "mesh": dict(mesh.shape), "processes": processes,
        "model": {"params": n_params, "trainable": n_trainable, "lora_rank": cfg.lora_rank,
                  "remat": cfg.remat, "scan_layers": cfg.scan_layers, "dtype": cfg.dtype,
                  "param_dtype": cfg.param_dtype},
        "batch": {"rows": rows, "length": length, "accum_steps": tr.accum_steps,
                  "examples_per_step": tr.batch_size},
        "per_device_bytes": mem, "fits": compiled is not None and mem["total"] <= t.memory,
        "refused_by_compiler": compiled is None, "compile_s": compile_s,
        "xla_flops_per_device": float(cost.get("flops", 0.0)),
        "model_flops_per_step": model_flops, "mfu": mfu, "step_s_at_mfu": step_s,
    }


def _refused(e: Exception, arguments: Any) -> dict[str, int]:
    """The per-device bytes of a step that the TPU compiler refused for lack of memory: the
    arguments' shards (the outputs are the donated state) and the temporaries XLA said it needs
    ("... HLO temporaries (107.86G) exceeds available HBM ..."). Any other error is raised."""
    import jax
    found = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or found is None:
        raise e
    temporaries = int(float(found[1]) * 1024 ** ("KMGT".index(found[2]) + 1))
    arguments_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                          for x in jax.tree.leaves(arguments))
    return {"arguments": arguments_bytes, "outputs": arguments_bytes, "aliased": arguments_bytes,
            "temporaries": temporaries}


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def describe(p: dict[str, Any], name: str) -> str:
    b, m, mem = p["batch"], p["model"], p["per_device_bytes"]
    gib = lambda x: f"{x / GIB:.2f} GiB"  # noqa: E731
    lines = [
        f"plan: {name} on {p['target']} ({p['devices']} devices of {gib(p['device_memory_bytes'])}"
        f", {p['processes']} host{'s' if p['processes'] > 1 else ''}; {p['compiler']})",
        f"model: {_count(m['params'])} params, {_count(m['trainable'])} trainable"
        f"{', LoRA rank %d' % m['lora_rank'] if m['lora_rank'] else ''}, remat {m['remat']}, "
        f"scan_layers {m['scan_layers']}, {m['dtype']} compute / {m['param_dtype']} masters",
        f"mesh: data {p['mesh']['data']} x fsdp {p['mesh']['fsdp']} x tensor {p['mesh']['tensor']}",
        f"batch: {b['rows']} rows x {b['length']} tokens per step, accum_steps {b['accum_steps']}",
        f"per device: arguments {gib(mem['arguments'])}, outputs {gib(mem['outputs'])} "
        f"({gib(mem['aliased'])} of them in donated arguments), temporaries "
        f"{gib(mem['temporaries'])}; total {gib(mem['total'])} of {gib(p['device_memory_bytes'])}"
        f": {'fits' if p['fits'] else 'DOES NOT FIT'} "
        f"({100 * mem['total'] / p['device_memory_bytes']:.0f}%)",
        f"compile: {p['compile_s']:.1f} s" + (": refused by the compiler for lack of memory "
                                               "(temporaries as it reported them)"
                                               if p["refused_by_compiler"] else ""),
        f"FLOPs per step: model {p['model_flops_per_step']:.3g} (training/perf.py); XLA " +
        ("n/a (not compiled)" if p["refused_by_compiler"] else
         f"{p['xla_flops_per_device']:.3g} per device (a scanned layer body counts once)"),
    ]
    if p["step_s_at_mfu"] is not None:
        lines.append(f"step time at {100 * p['mfu']:.0f}% MFU: {p['step_s_at_mfu']:.2f} s")
    return "\n".join(lines)


def run() -> None:
    """The command line. Its flags are defined here, not at import, so that tests can import this
    module beside others that define --config."""
    config = config_flags.DEFINE_config_file("config", None, "config file[:variant]",
                                             lock_config=True)
    topology = flags.DEFINE_string("topology", None, f"one of {', '.join(TARGETS)} or cpu-N")
    json_out = flags.DEFINE_string("json", None, "also write the plan to this JSON file")
    rows = flags.DEFINE_integer("rows", 0, "rows per step; 0 = train.batch_size rounded up")
    mfu = flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation for the implied step time")
    memory = flags.DEFINE_float("memory_gib", 0.0, "device memory in GiB; 0 = the target's")

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        with cli.user_errors():
            t = target(topology.value, memory.value)
            use_fake_cpu_devices(t)
            with cli.user_errors((OSError,)):
                config.value.to_dict()  # the file is loaded on first use
            p = plan(config.value, t, rows.value, mfu.value)
        name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                    "the config")
        print(describe(p, name))
        if json_out.value:
            storage.path(json_out.value).write_text(
                json.dumps({"config": name, **p}, indent=1) + "\n")
        sys.exit(0 if p["fits"] else 1)

    flags.mark_flags_as_required(["config", "topology"])
    app.run(main, flags_parser=cli.parse_absl_flags)


if __name__ == "__main__":
    run()
