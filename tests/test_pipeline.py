"""ideal_ray.pipelines.pipeline: the stage runner's skip-if-done and resume rules, on stages that write real files.

(The real chain runs end to end in `make demo` and the cluster integration test.)"""

import json
import os

import pytest

from ideal_ray.pipelines.pipeline import STATE_FILE, Stage, run_stages


def _chain(tmp_path, calls, fail_at=None):
    def make(name, inputs):
        def run(state):
            calls.append(name)
            if name == fail_at:
                raise RuntimeError(f"{name} crashed")
            for dep in inputs:  # a stage reads what the earlier ones recorded
                assert os.path.isfile(state["stages"][dep]["outputs"]["file"])
            path = str(tmp_path / f"{name}.out")
            with open(path, "w") as f:
                f.write(name)
            return {"file": path}

        return Stage(name, run, lambda out: os.path.isfile(out["file"]))

    return [make("a", []), make("b", ["a"]), make("c", ["a", "b"])]


def test_rerun_skips_finished_stages_and_redoes_only_lost_outputs(tmp_path):
    calls = []
    run_dir = str(tmp_path / "run")
    state = run_stages(run_dir, _chain(tmp_path, calls), log=lambda m: None)
    assert calls == ["a", "b", "c"] and not any(r["skipped"] for r in state["stages"].values())
    saved = json.load(open(os.path.join(run_dir, STATE_FILE)))
    assert list(saved["stages"]) == ["a", "b", "c"] and saved["stages"]["c"]["outputs"]["file"].endswith("c.out")

    calls.clear()
    state = run_stages(run_dir, _chain(tmp_path, calls), log=lambda m: None)
    assert calls == [] and all(r["skipped"] for r in state["stages"].values())

    os.remove(tmp_path / "b.out")  # an output lost: that stage runs again, the others stay skipped
    calls.clear()
    run_stages(run_dir, _chain(tmp_path, calls), log=lambda m: None)
    assert calls == ["b"]


def test_a_crash_keeps_the_finished_stages_and_the_rerun_resumes_there(tmp_path):
    calls = []
    run_dir = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="b crashed"):
        run_stages(run_dir, _chain(tmp_path, calls, fail_at="b"), log=lambda m: None)
    assert list(json.load(open(os.path.join(run_dir, STATE_FILE)))["stages"]) == ["a"]
    calls.clear()
    run_stages(run_dir, _chain(tmp_path, calls), log=lambda m: None)
    assert calls == ["b", "c"]


def test_only_and_bad_state_are_clear_errors(tmp_path):
    run_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="unknown stage"):
        run_stages(run_dir, _chain(tmp_path, []), only=["z"], log=lambda m: None)
    with pytest.raises(RuntimeError, match="has not run yet"):
        run_stages(run_dir, _chain(tmp_path, []), only=["b"], log=lambda m: None)
    calls = []
    run_stages(run_dir, _chain(tmp_path, calls), only=["a"], log=lambda m: None)
    assert calls == ["a"]  # stops before b: b was not asked for and is not done
    with open(os.path.join(run_dir, STATE_FILE), "w") as f:
        f.write('["not a state"]')
    with pytest.raises(ValueError, match="not a pipeline state file"):
        run_stages(run_dir, _chain(tmp_path, []), log=lambda m: None)
