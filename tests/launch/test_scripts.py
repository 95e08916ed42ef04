"""The launch scripts: shellcheck-clean, and their dry runs print the commands a user expects."""
import os
import subprocess


from tests.conftest import ROOT

LAUNCH = ROOT / "launch"
TRAIN_ARGS = ["--config=configs/llama3.py:8b", "--workdir", "gs://bucket/run 1"]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_scripts_pass_shellcheck(shellcheck):
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh")) + ["scripts/setup.sh", "scripts/test.sh",
                                                               ".ci/run"]
    result = subprocess.run([shellcheck, *scripts], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_tpu_pod_dry_run_prints_every_step():
    result = _run("launch/tpu_pod.sh", "--dry-run", "--name", "derta-v5p", "--zone", "us-east5-a",
                  "--accelerator-type", "v5p-64", "up", "--", *TRAIN_ARGS)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create derta-v5p --zone us-east5-a "
                               "--accelerator-type v5p-64")
    assert lines[1].startswith("git archive")
    assert "scp" in lines[2] and "--worker=all" in lines[2]
    assert "--worker=all" in lines[3] and "scripts/setup.sh" in lines[3]
    assert "jax\\[tpu\\]==0.10.2" in lines[3]
    train = lines[4]
    assert "--worker=all" in train and "python\\ -m\\ derta_jax.train" in train
    # The train arguments survive quoting (a space inside one argument stays one argument).
    assert "--config=configs/llama3.py:8b" in train and "run\\\\\\ 1" in train
    assert "--worker=0" in lines[5] and "train.log" in lines[5]


def test_tpu_pod_stop_and_delete():
    base = ["launch/tpu_pod.sh", "--dry-run", "--name", "p", "--zone", "z"]
    stop = _run(*base, "stop").stdout
    assert "--worker=all" in stop and "pkill\\ -TERM" in stop
    assert _run(*base, "delete").stdout.strip() == "gcloud compute tpus tpu-vm delete p --zone z --quiet"


def test_tpu_pod_rejects_missing_arguments():
    result = _run("launch/tpu_pod.sh", "--dry-run", "up")
    assert result.returncode == 2 and "need --name, --zone" in result.stderr


def test_gpu_slurm_dry_run():
    result = _run("launch/gpu_slurm.sh", "--dry-run", *TRAIN_ARGS)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92" in out
    assert "xla_gpu_enable_latency_hiding_scheduler=true" in out
    assert ("srun --ntasks-per-node=1 --kill-on-bad-exit=1 .venv/bin/python -m derta_jax.train "
            "--config=configs/llama3.py:8b --workdir gs://bucket/run\\ 1") in out


def test_gpu_slurm_sbatch_header():
    text = (LAUNCH / "gpu_slurm.sh").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=8" in text
