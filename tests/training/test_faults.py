"""SIGKILLs at random points of `python -m derta_jax.train`, then resume: the final train state is
bit-identical to the uninterrupted run's and metrics.jsonl holds exactly one row per step.
benchmarks/faults.py runs the 20-kill version."""
import random

from benchmarks import faults
from tests.training.conftest import BASE, BASE_STEPS
from tests.training.run_helpers import tiny_flags


def test_kills_during_saves_and_steps_resume_bit_identical(base_run, compile_cache, tmp_path):
    work = tmp_path / "killed"
    # 1st start: killed during its first save (only a temporary folder is left: start over);
    # 2nd: killed at most 0.05 s after its first checkpoint (step 2) is complete (a fast machine
    # finishes steps 3-4 and their save within 0.4 s, leaving nothing to resume); 3rd: resumes.
    events = faults.kill_until_done(work, tiny_flags(BASE_STEPS, **BASE), ["save", "after-save"],
                                    random.Random(0), faults.train_env(compile_cache),
                                    tmp_path / "logs", delay=(0.0, 0.05))
    assert events == ["killed during a save", "killed after a save", "finished"], events
    assert "resuming from" in (tmp_path / "logs" / "start_2.log").read_text()
    assert faults.same_state(base_run, work, BASE_STEPS)
    assert faults.rows_match(base_run, work, BASE_STEPS) == (True, "")
