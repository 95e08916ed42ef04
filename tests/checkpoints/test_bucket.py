"""Model dirs, workdirs, exports and generate outputs in a gs:// bucket (the fake one of
tests/fake_bucket.py) equal their local twins exactly.

Every check goes through the URL as the user gives it, so a path collapsed to `gs:/...` (what
`pathlib.Path` makes of a URL) writes or looks in a local folder instead and fails.
"""
import json
import pathlib

import numpy as np
import orbax.checkpoint as ocp
import pytest

from derta_jax import cli, convert, export, generate, storage
from derta_jax.checkpoints.gguf import lazy_gguf
from derta_jax.checkpoints.model_dir import (load_tokenizer, local_tokenizer_dir,
                                             save_model_dir)
from derta_jax.checkpoints.resolve import available_steps, resolve_checkpoint
from derta_jax.evaluation import loading

PROMPTS = ["Sorry, I", "Step 1:"]


@pytest.fixture(scope="module")
def converted(hf_checkpoint, llama3_tokenizer_dir, bucket, tmp_path_factory):
    """(local model dir, the same converted into the bucket, the HF folder) of the tiny llama."""
    folder, _ = hf_checkpoint("llama")
    args = ["--hf", str(folder), "--tokenizer", str(llama3_tokenizer_dir), "--out"]
    local = convert.main(args + [str(tmp_path_factory.mktemp("bucket_local") / "model")])
    remote = f"{bucket}/ckpt-tests/convert/model"
    assert str(convert.main(args + [remote])) == remote
    return local, remote, folder


@pytest.fixture(scope="module")
def bucket_hf(converted, llama3_tokenizer_dir, bucket):
    """The tiny llama's HF folder with its tokenizer and a pickle file beside it, in the bucket."""
    src = f"{bucket}/ckpt-tests/source/hf"
    storage.upload(converted[2], src)
    for f in llama3_tokenizer_dir.glob("tokenizer*.json"):  # the folder's own tokenizer
        storage.upload(f, f"{src}/{f.name}")
    (storage.path(src) / "pytorch_model.bin").write_bytes(b"never downloaded nor read")
    return src


def _same_params(a, b):
    assert a.cfg == b.cfg
    assert list(a.params) == list(b.params)
    for path in a.params:
        np.testing.assert_array_equal(a.read_param(path), b.read_param(path), err_msg=str(path))


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file()}


def test_convert_writes_into_the_bucket_and_reads_back_exactly(converted):
    local, remote, _ = converted
    stored = storage.path(remote)
    assert (stored / "model_config.json").exists() and (stored / "params").is_dir()
    assert (stored / "tokenizer.json").exists()  # staged up, not left in a temporary folder
    ckpt = resolve_checkpoint(remote)
    assert ckpt.kind == "model_dir" and str(ckpt.item_dir) == f"{remote}/params"
    _same_params(resolve_checkpoint(local), ckpt)
    assert load_tokenizer(remote)("Sorry", add_special_tokens=False)["input_ids"] == [19701]


def test_the_tokenizer_copy_holds_no_weights(converted, bucket_hf):
    copied = sorted(p.name for p in local_tokenizer_dir(converted[1]).iterdir())
    assert "tokenizer.json" in copied and "model_config.json" in copied and "params" not in copied
    copied = sorted(p.name for p in local_tokenizer_dir(bucket_hf).iterdir())
    assert "tokenizer.json" in copied and "config.json" in copied
    assert "model.safetensors" not in copied and "pytorch_model.bin" not in copied


def test_export_from_and_to_the_bucket_is_byte_identical(converted, bucket, tmp_path, capsys):
    local, remote, _ = converted
    out = f"{bucket}/ckpt-tests/export/hf"
    export.main(["--checkpoint", remote, "--out", out])
    assert f"exported {remote} to {out} in" in capsys.readouterr().out
    export.main(["--checkpoint", str(local), "--out", str(tmp_path / "hf")])
    want = _files(tmp_path / "hf")
    assert "model-00001-of-00001.safetensors" in want and "tokenizer.json" in want
    assert _files(storage.local_copy(out)) == want


def test_convert_from_a_bucket_source(converted, bucket_hf, bucket):
    out = convert.main(["--hf", bucket_hf, "--out", f"{bucket}/ckpt-tests/source/model"])
    _same_params(resolve_checkpoint(converted[0]), resolve_checkpoint(out))


def test_a_training_workdir_in_the_bucket(converted, bucket):
    local, _, _ = converted
    ref = resolve_checkpoint(local)
    workdir = f"{bucket}/ckpt-tests/workdir/run"
    save_model_dir(f"{workdir}/model", ref.cfg, None, load_tokenizer(local))
    ocp.PyTreeCheckpointer().save(storage.path(f"{workdir}/checkpoints/3/state"),
                                  {"params": ref.params_tree()})
    (storage.path(workdir) / "checkpoints" / "4.orbax-checkpoint-tmp-1" / "x").write_text("")
    assert available_steps(workdir) == [3]
    for given in (workdir, f"{workdir}/checkpoints/3"):
        ckpt = resolve_checkpoint(given)
        assert (ckpt.kind, ckpt.step, str(ckpt.tokenizer_dir)) == ("workdir", 3, f"{workdir}/model")
        _same_params(ref, ckpt)
    assert str(loading.tokenizer_dir(workdir)) == f"{workdir}/model"
    assert loading.model_name(resolve_checkpoint(workdir)) == "run@3"


def test_generate_reads_and_writes_the_bucket(converted, bucket, tmp_path):
    local, remote, _ = converted
    prompts = "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS)
    (tmp_path / "p.jsonl").write_text(prompts)
    storage.path(f"{bucket}/ckpt-tests/generate/p.jsonl").write_text(prompts)
    common = ["--max-new-tokens", "3", "--batch-size", "2"]
    want = generate.main(["--checkpoint", str(local), "--prompts", str(tmp_path / "p.jsonl"),
                          "--out", str(tmp_path / "o.jsonl"), *common])
    out = f"{bucket}/ckpt-tests/generate/o.jsonl"
    got = generate.main(["--checkpoint", remote, "--prompts",
                         f"{bucket}/ckpt-tests/generate/p.jsonl", "--out", out, *common])
    assert got == want and len(got) == len(PROMPTS)
    assert storage.path(out).read_text() == (tmp_path / "o.jsonl").read_text()


def _one_line_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_missing_bucket_paths_are_one_line_naming_the_url(bucket, capsys):
    nowhere = f"{bucket}/ckpt-tests/nowhere"
    err = _one_line_error(capsys, export.main, ["--checkpoint", nowhere, "--out", f"{nowhere}/o"])
    assert f"{nowhere} is not a derta_jax checkpoint: it does not exist" in err
    err = _one_line_error(capsys, convert.main, ["--hf", nowhere, "--out", f"{nowhere}/o"])
    assert f"Hugging Face folder not found: {nowhere}" in err
    err = _one_line_error(capsys, convert.main, ["--gguf", f"{nowhere}/m.gguf", "--out", nowhere])
    assert f"GGUF file not found: {nowhere}/m.gguf" in err
    err = _one_line_error(capsys, generate.main, [
        "--checkpoint", nowhere, "--prompts", f"{nowhere}/p.jsonl", "--out", f"{nowhere}/o.jsonl",
        "--max-new-tokens", "1"])
    assert f"{nowhere}/p.jsonl: no such file" in err


def test_a_cut_gguf_in_the_bucket_is_named_by_its_url(smollm2_gguf, bucket):
    url = f"{bucket}/ckpt-tests/gguf/cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        storage.path(url).write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match=rf"^{url} (is not a readable GGUF file|is truncated)"):
        lazy_gguf(url, progress=False)

