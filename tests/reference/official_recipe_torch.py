"""The official DeRTa training step, reimplemented in PyTorch: the reference our step is tested
against (tests/reference/test_official_recipe.py) and timed against (benchmarks/official_recipe.py).

An independent reimplementation of what the authors' code (RobustNLP/DeRTa, an Alpaca-style
`train.py` on the Hugging Face Trainer with DeepSpeed) does with the `{prefix, text, safe}` records,
written from derta-method.md and sharing no code with derta_jax:

- `prefix` and `prefix + text` are tokenised separately with the tokenizer's own special tokens,
  truncated to the block size; the first len(tokens(prefix)) labels are -100 (`tokenize`);
- the collator pads every batch to its longest example (`collate`);
- inside the forward, a per-example Python loop replaces every supervised label of a
  `safe == "true"` example by the refusal id (`rto_labels`);
- the loss is transformers' own shifted-label cross-entropy: one mean over all supervised tokens
  of the batch (`pooled_loss`);
- AdamW with weight decay on every tensor, as DeepSpeed's (`official_optimizer`), after
  global-norm clipping (`train_step`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
import transformers

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class OfficialExample:
    input_ids: list[int]
    labels: list[int]  # -100 on the prefix; RTO replacement happens later, in the forward
    safe: bool


def _encode(tokenizer: Any, text: str, bos_id: int | None) -> list[int]:
    """The tokenizer's ids with its default special tokens; `bos_id` is put first when the
    tokenizer does not (Meta's LLaMA-3 tokenizer adds <|begin_of_text|> in its post-processor;
    local copies without that post-processor need it here)."""
    ids = list(tokenizer(text)["input_ids"])
    if bos_id is not None and ids[:1] != [bos_id]:
        ids = [bos_id] + ids
    return ids


def tokenize(records: Sequence[Mapping[str, str]], tokenizer: Any, max_length: int,
             bos_id: int | None = None) -> list[OfficialExample]:
    """Official-format records `{prefix, text, safe: "true"|"false"}` -> input ids and labels."""
    out = []
    for r in records:
        if r["safe"] not in ("true", "false"):
            raise ValueError(f"record field 'safe'={r['safe']!r}: expected 'true' or 'false'")
        n_prefix = len(_encode(tokenizer, r["prefix"], bos_id))
        ids = _encode(tokenizer, r["prefix"] + r["text"], bos_id)[:max_length]
        labels = [IGNORE_INDEX] * min(n_prefix, len(ids)) + ids[n_prefix:]
        out.append(OfficialExample(ids, labels, r["safe"] == "true"))
    return out


def collate(examples: Sequence[OfficialExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding to the longest example of the batch; labels padded with -100."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        attention[i, :len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels,
            "safe": torch.tensor([e.safe for e in examples])}


def rto_labels(labels: torch.Tensor, safe: torch.Tensor, refusal_id: int) -> torch.Tensor:
    """Every supervised label of a safe (RTO) example becomes the refusal id (per-example loop)."""
    labels = labels.clone()
    for i in range(labels.shape[0]):
        if safe[i]:
            labels[i][labels[i] != IGNORE_INDEX] = refusal_id
    return labels


def pooled_loss(model: transformers.PreTrainedModel, batch: Mapping[str, torch.Tensor],
                refusal_id: int) -> torch.Tensor:
    """transformers' causal-LM loss: logits at t against label t + 1, mean over all labels != -100."""
    labels = rto_labels(batch["labels"], batch["safe"], refusal_id)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=labels).loss


def supervised_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def official_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
                       ) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on every trainable tensor, norm weights included, as the
    DeepSpeed AdamW of the official runs (derta-method.md, "Hyperparameters")."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                             betas=betas, eps=eps, weight_decay=weight_decay)


def train_step(model: transformers.PreTrainedModel, optimizer: torch.optim.Optimizer,
               batch: Mapping[str, torch.Tensor], refusal_id: int, max_grad_norm: float = 1.0
               ) -> float:
    """Forward, backward, global-norm clipping, AdamW; returns the batch loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = pooled_loss(model, batch, refusal_id)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return float(loss.detach())
