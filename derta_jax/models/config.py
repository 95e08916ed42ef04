"""The frozen model configuration: one decoder for LLaMA-3(.1), Mistral and Mixtral.

Architecture fields mirror Hugging Face `config.json`; runtime fields (dtype, remat, scan, LoRA)
are ours and never written back to `config.json`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl",
                  "attention_block", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1 rope scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Architecture (from / to config.json).
    model_type: str = "llama"
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    sliding_window: int | None = None  # Mistral v0.1: 4096; enforced in the attention mask.
    tie_word_embeddings: bool = False
    num_experts: int = 0  # 0 = dense MLP; Mixtral: 8.
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    bos_token_id: int | None = 128000
    eos_token_ids: tuple[int, ...] = (128001,)
    # Runtime (ours; also the run config's `model` keys, see RUNTIME_FIELDS).
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (master weights: param_dtype)
    param_dtype: str = "float32"  # master weight and optimizer state dtype
    remat: str = "none"  # none | full | dots: activation rematerialisation per layer
    scan_layers: bool = False  # nn.scan over layers (params stacked under "layers"; faster compile)
    attention_impl: str = "auto"  # auto | xla | cudnn
    attention_block: int = 128  # query blocks skip later keys; a cache is read in blocks (0: off)
    lora_rank: int = 0  # 0 = full-parameter training; > 0 = LoRA with frozen base weights
    lora_alpha: float = 16.0  # LoRA scale numerator (scale = alpha / rank)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = LORA_TARGETS  # projections that get adapters

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected float32 or bfloat16")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat={self.remat!r}: expected none, full or dots")
        if self.attention_block < 0:
            raise ValueError(f"attention_block={self.attention_block}: expected >= 0")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank}: expected >= 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout}: expected in [0, 1)")
        bad = set(self.lora_targets) - set(LORA_TARGETS)
        if bad:
            raise ValueError(f"lora_targets has unknown names {sorted(bad)}; known: {LORA_TARGETS}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf(cls, config: str | os.PathLike | dict[str, Any], **runtime) -> "ModelConfig":
        """Reads a Hugging Face `config.json` (path, folder or dict), in both of its shapes.

        Hub checkpoints write `rope_theta` and `rope_scaling`; transformers 5 `save_pretrained`
        writes one `rope_parameters` dict. Rope scaling is read from the file, never inferred.
        """
        if not isinstance(config, dict):
            path = os.path.join(config, "config.json") if os.path.isdir(config) else config
            with open(path) as f:
                config = json.load(f)
        c = config
        model_type = c.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        rope = dict(c.get("rope_parameters") or {})
        if c.get("rope_scaling"):
            rope.update(c["rope_scaling"])
        theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        elif rope_type not in ("default", None):
            raise ValueError(f"unsupported rope type {rope_type!r} in config.json (supported: default, llama3)")
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        num_heads = c["num_attention_heads"]
        window = c.get("sliding_window") if model_type in ("mistral", "mixtral") else None
        return cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=c.get("num_key_value_heads") or num_heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // num_heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=c.get("max_position_embeddings", 8192),
            sliding_window=window,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            num_experts=c.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            num_experts_per_tok=c.get("num_experts_per_tok", 2),
            router_aux_loss_coef=c.get("router_aux_loss_coef", 0.02),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **runtime,
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict for this architecture (Hub shape)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "mixtral": "MixtralForCausalLM"}[self.model_type]
        c: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                             else list(self.eos_token_ids)),
            "attention_bias": False,
            "torch_dtype": self.param_dtype,
        }
        if self.rope_scaling is not None:
            c["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.model_type in ("mistral", "mixtral"):
            c["sliding_window"] = self.sliding_window
        if self.model_type == "mixtral":
            c.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     router_aux_loss_coef=self.router_aux_loss_coef)
        if self.model_type == "llama":
            c["mlp_bias"] = False
        return c

    # ---- our own model dir -------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        d = json.loads(text)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        for k in ("eos_token_ids", "lora_targets"):
            d[k] = tuple(d[k])
        return cls(**d)


_LLAMA3_8B = ModelConfig()
PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": _LLAMA3_8B,
    "llama3-70b": _LLAMA3_8B.replace(hidden_size=8192, intermediate_size=28672, num_layers=80,
                                     num_heads=64),
    "llama3.1-8b": _LLAMA3_8B.replace(
        max_position_embeddings=131072, eos_token_ids=(128001, 128008, 128009),
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)),
    "mistral-7b": ModelConfig(model_type="mistral", vocab_size=32000, rope_theta=10000.0,
                              max_position_embeddings=32768, sliding_window=4096,
                              bos_token_id=1, eos_token_ids=(2,)),
    "mixtral-8x7b": ModelConfig(model_type="mixtral", vocab_size=32000, rope_theta=1e6,
                                max_position_embeddings=32768, num_experts=8,
                                num_experts_per_tok=2, bos_token_id=1, eos_token_ids=(2,)),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rope_theta=100000.0, tie_word_embeddings=True,
                                bos_token_id=1, eos_token_ids=(2,)),
}


def preset(name: str, **runtime) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**runtime)
