"""benchmarks/gpu_bench.py runs end to end with --tiny (on CPU), the FLOP count behind its MFU
(training/perf.py) matches the weights the decoder really has, and gpu.sh is shellcheck-clean."""
import math
import subprocess

import jax

from benchmarks import gpu_bench
from tests.conftest import ROOT
from derta_jax.models.decoder import init_variables
from derta_jax.training import perf


def test_tiny_run_reports_every_figure(tmp_path):
    out = tmp_path / "figures.json"
    figures = gpu_bench.main(["--tiny", "--steps", "1", "--out", str(out)])
    assert out.exists()
    for key in ("bf16_peak_tflops", "step_s", "tokens_per_s", "mfu", "gen_tokens_per_s"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key


def test_flops_per_token_count_the_decoders_matmul_weights():
    cfg = gpu_bench.SHAPES["tiny"].model.replace(tie_word_embeddings=False)
    params = init_variables(cfg, jax.random.PRNGKey(0))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    matmul = sum(x.size for path, x in leaves if jax.tree_util.keystr(path[-1:]) == "['kernel']")
    seq = 64
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq  # QK^T and AV, fwd + bwd
    assert perf.train_flops_per_token(cfg, seq) == 6 * matmul + attention


def test_gpu_script_passes_shellcheck(shellcheck):
    result = subprocess.run([shellcheck, "benchmarks/gpu.sh"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout
