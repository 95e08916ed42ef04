"""eval and generate on a real training workdir (2 LoRA steps of configs/tiny.py, scan_layers,
8 devices): the same answers as on the same weights saved as a model dir.

The reference weights come from Orbax's whole-tree restore of the step (not the per-tensor
reader) with the adapters merged by the literal formula W + alpha/r * A @ B in numpy.
"""
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from derta_jax import eval as eval_cli
from derta_jax import generate as generate_cli
from derta_jax.checkpoints.model_dir import load_config, load_tokenizer, save_model_dir
from derta_jax.checkpoints.resolve import resolve_checkpoint
from derta_jax.evaluation.generation import generate
from derta_jax.evaluation.loading import load_eval_model, parse_mesh
from derta_jax.evaluation.tasks import encode_prompt, stop_ids
from derta_jax.models.layout import unstack_layers
from derta_jax.training import loop
from tests.training.run_helpers import tiny_config

QUESTIONS = ["Step 1: take the", "Here is how to", "The answer is"]
NEW = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, llama3_tokenizer_dir):
    config = tiny_config(steps=2)
    config.model.lora_rank = 4
    config.model.scan_layers = True
    config.optimizer.learning_rate = 3e-2  # so that the adapters change the answers
    config.checkpoint.every_steps = 1
    path = tmp_path_factory.mktemp("run") / "workdir"
    loop.train(config, path)
    return path


def restored(workdir, step):
    """(inference cfg, base params, lora, literally merged params) of one step, canonical layout."""
    cfg = load_config(workdir / "model")
    state = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    params, lora = unstack_layers(state["params"]), unstack_layers(state["lora"])
    flat_lora = traverse_util.flatten_dict(lora)
    merged = {}
    for path, w in traverse_util.flatten_dict(params).items():
        w = np.asarray(w)
        if path[:-1] + ("lora_a",) in flat_lora:
            a, b = (np.asarray(flat_lora[path[:-1] + (n,)], np.float64) for n in ("lora_a", "lora_b"))
            w = (w + cfg.lora_alpha / cfg.lora_rank * (a @ b).reshape(w.shape)).astype(w.dtype)
        merged[path] = w
    return cfg.replace(scan_layers=False), params, lora, traverse_util.unflatten_dict(merged)


@pytest.fixture(scope="module")
def model_dir(workdir, tmp_path_factory):
    """Step 2's weights, merged, saved as a plain model dir."""
    cfg, _, _, merged = restored(workdir, 2)
    return save_model_dir(tmp_path_factory.mktemp("ref") / "merged", cfg.replace(lora_rank=0),
                          merged, load_tokenizer(workdir / "model"))


@pytest.fixture(scope="module")
def test_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sets") / "safety_completionattack.jsonl"
    path.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    return path


def test_loader_reads_the_latest_step_merged_and_a_chosen_step(workdir):
    for step in (2, 1):
        _, params, _, merged = restored(workdir, step)
        model = load_eval_model(resolve_checkpoint(workdir, None if step == 2 else step))
        assert model.name == f"workdir@{step}" and model.cfg.lora_rank == 0
        assert not model.cfg.scan_layers
        got = traverse_util.flatten_dict(jax.device_get(model.params))
        want = traverse_util.flatten_dict(merged)
        assert got.keys() == want.keys()
        for path in want:
            np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-6, err_msg=str(path))
    kernel = ("layers_1", "attn", "v_proj", "kernel")
    base = traverse_util.flatten_dict(params)[kernel]
    assert np.abs(want[kernel] - np.asarray(base)).max() > 1e-3  # the adapters really moved


def rows(out, name="completionattack"):
    keep = ("index", "question", "prompt", "response", "num_tokens", "finish_reason", "judges")
    return [{k: r[k] for k in keep} for r in map(json.loads, (out / f"{name}.jsonl").open())]


def run_eval(checkpoint, test_file, out, *extra):
    return eval_cli.main(["--checkpoint", str(checkpoint), "--tests", str(test_file), "--out",
                          str(out), "--max-new-tokens", str(NEW), "--batch-size", "4",
                          "--no-progress", *extra])


def test_eval_on_workdir_equals_eval_on_model_dir(workdir, model_dir, test_file, tmp_path):
    run_eval(workdir, test_file, tmp_path / "workdir")
    run_eval(model_dir, test_file, tmp_path / "model_dir")
    assert rows(tmp_path / "workdir") == rows(tmp_path / "model_dir")
    run = json.loads((tmp_path / "workdir" / "run.json").read_text())
    assert (run["model"], run["step"]) == ("workdir@2", 2)
    # The latest step is recorded: resuming into this out dir with another step is refused.
    with pytest.raises(ValueError, match="step: 2 -> 1"):
        run_eval(workdir, test_file, tmp_path / "workdir", "--step", "1")


def test_generate_on_workdir_equals_unmerged_adapters(workdir, tmp_path):
    """generate's merged weights give the answers of the base weights + adapters applied."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    got = generate_cli.main(["--checkpoint", str(workdir), "--prompts", str(prompts), "--out",
                             str(tmp_path / "out.jsonl"), "--max-new-tokens", str(NEW)])
    cfg, params, lora, _ = restored(workdir, 2)
    tokenizer = load_tokenizer(workdir / "model")
    ids = [encode_prompt(q, tokenizer, chat=False) for q in QUESTIONS]
    applied = generate(params, cfg, ids, max_new_tokens=NEW, stop_ids=stop_ids(cfg, tokenizer),
                       lora=lora, progress=False)
    without = generate(params, cfg.replace(lora_rank=0), ids, max_new_tokens=NEW,
                       stop_ids=stop_ids(cfg, tokenizer), progress=False)
    assert [g.token_ids for g in applied] != [g.token_ids for g in without]  # LoRA matters here
    assert [r["response"] for r in got] == [
        tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in applied]
    assert [r["num_tokens"] for r in got] == [len(g.token_ids) for g in applied]


def test_each_tensor_is_read_only_as_the_slices_the_devices_hold(workdir, monkeypatch):
    """On a mesh that shards the kernels (fsdp 4 x tensor 2), every read is one device's slice,
    each distinct slice is read once (replicas share it), a sharded tensor is never read whole,
    and the merged slices equal the literal merge: a process reads only its devices' share."""
    _, _, _, merged = restored(workdir, 2)
    ckpt = resolve_checkpoint(workdir)
    reads = []
    real = type(ckpt).read_param

    def spy(self, path, index=()):
        reads.append((path, tuple((s.start, s.stop) for s in index)))
        return real(self, path, index)

    monkeypatch.setattr(type(ckpt), "read_param", spy)
    model = load_eval_model(ckpt, mesh=parse_mesh("1,4,2"))
    monkeypatch.undo()
    assert len(reads) == len(set(reads))
    got, want = (traverse_util.flatten_dict(t) for t in (model.params, merged))
    sharded = [p for p, x in got.items() if not x.sharding.is_fully_replicated]
    assert ("layers_0", "attn", "q_proj", "kernel") in sharded and len(sharded) > len(got) // 2
    for path, x in got.items():
        indices = {tuple((s.start, s.stop) for s in i)
                   for i in x.sharding.addressable_devices_indices_map(x.shape).values()}
        read = {i for p, i in reads if p == path}
        if x.sharding.is_fully_replicated:
            assert len(read) == 1, path
        else:  # exactly the distinct shards, none of them the whole tensor
            assert read == indices and all(any(s != (None, None) for s in i) for i in read), path
        np.testing.assert_allclose(np.asarray(x), want[path], rtol=1e-6, atol=1e-6,
                                   err_msg=str(path))
