"""scripts/demo.sh: its dry run lists the README demo's steps in order, with the right arguments."""
import os
import shlex
import subprocess


from derta_jax.data import selfgen
from derta_jax.experiments.ablation import load_config_file
from tests.conftest import ROOT


def dry_run(*args: str, **env: str) -> list[list[str]]:
    result = subprocess.run(["bash", "scripts/demo.sh", "--dry-run", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("==")]


def test_dry_run_lists_setup_eval_train_eval_compare():
    steps = dry_run("--config.train.steps=5", DEMO_OUT="runs/x", DEMO_LIMIT="3")
    assert steps[0] == ["bash", "scripts/setup.sh"]
    commands = [s for s in steps if s[:2] == [".venv/bin/python", "-m"]]
    modules = [c[2] for c in commands if c[2] != "derta_jax.convert"]
    # (selfgen is listed unless its pairs are there already, as convert is)
    gen = [c for c in commands if c[2] == "derta_jax.data.selfgen"]
    assert [m for m in modules if m != "derta_jax.data.selfgen"] == [
        "derta_jax.eval", "derta_jax.train", "derta_jax.eval", "derta_jax.eval"]
    before, train, after, compare = [c for c in commands if c[2] in ("derta_jax.eval",
                                                                    "derta_jax.train")]
    model = before[before.index("--checkpoint") + 1]
    assert model == "runs/models/smollm2-135m"
    for c in gen:  # the pairs configs/smollm2.py trains on, made as the ablation makes them
        assert c[3:] == ["--checkpoint", model, "--out", selfgen.DEMO_PAIRS, *selfgen.DEMO_ARGS,
                         "--no-progress"]
    assert load_config_file(str(ROOT / "configs" / "smollm2.py")).data.helpful.split(",")[-1] \
        == selfgen.DEMO_PAIRS
    assert "--config=configs/smollm2.py" in train
    assert train[train.index("--workdir") + 1] == "runs/x/train"
    assert f"--config.model.checkpoint={model}" in train
    assert train[-1] == "--config.train.steps=5"  # the caller's override comes last and wins
    assert after[after.index("--checkpoint") + 1] == "runs/x/train"
    for ev in (before, after):
        assert "--chat" in ev and ev[ev.index("--limit") + 1] == "3"
        tests = ev[ev.index("--tests") + 1].split(",")
        assert [os.path.basename(t) for t in tests] == [
            "safety_completionattack.jsonl", "safety_harmful_questions.jsonl",
            "helpfulness_overrefusal.jsonl", "helpfulness_howto.jsonl",
            "helpfulness_broad.jsonl"]
        assert all((ROOT / t).exists() for t in tests)
    assert compare[3:] == ["compare", "runs/x/eval-before", "runs/x/eval-after", "--out",
                           "runs/x/compare"]


def test_demo_script_passes_shellcheck(shellcheck):
    result = subprocess.run([shellcheck, "scripts/demo.sh"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout
