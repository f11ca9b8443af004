"""The benchmark scripts' shared resume loop and return-at-budget rule (benchmarks/common.py)."""

import math

from benchmarks.common import append_result, late_return, load_results, run_cells


def test_run_cells_trains_each_missing_run_once_and_reuses_saved_ones(tmp_path):
    path = tmp_path / "runs.json"
    trained = []

    def cell(seed, steps=100):
        def train():
            trained.append(seed)
            return {"score": seed * 10}
        return (f"seed {seed}", {"seed": seed, "steps": steps}, train)

    first = run_cells(path, [cell(0), cell(1)])
    assert trained == [0, 1] and [r["score"] for r in first] == [0, 10]
    again = run_cells(path, [cell(0), cell(1), cell(2)])
    assert trained == [0, 1, 2]  # only the new cell trained
    assert [r["seed"] for r in again] == [0, 1, 2] and len(load_results(path)) == 3
    # a changed setting is a different run; --report-only trains nothing and leaves it out
    assert run_cells(path, [cell(0, steps=200)], report_only=True) == [] and trained == [0, 1, 2]
    # --fresh empties the file first
    assert [r["seed"] for r in run_cells(path, [cell(5)], fresh=True)] == [5] and len(load_results(path)) == 1


def test_run_cells_sees_runs_that_another_process_saved_meanwhile(tmp_path):
    path = tmp_path / "runs.json"

    def train_0():
        append_result(path, {"seed": 1, "score": 99})  # another process finishes seed 1 meanwhile
        return {"score": 0}

    def train_1():
        raise AssertionError("seed 1 was already saved by the other process")

    runs = run_cells(path, [("seed 0", {"seed": 0}, train_0), ("seed 1", {"seed": 1}, train_1)])
    assert [r["score"] for r in runs] == [0, 99]


def test_late_return_averages_the_last_iterations_with_an_episode_up_to_the_budget():
    run = {"curve": {"env_steps": [10, 20, 30, 40, 50], "wall_s": [1, 2, 3, 4, 5],
                     "return": [1.0, float("nan"), 3.0, 5.0, 7.0]}}
    assert late_return(run) == (3.0 + 5.0 + 7.0) / 3
    assert late_return(run, 40) == (1.0 + 3.0 + 5.0) / 3  # the NaN iteration is skipped, not averaged
    assert late_return(run, 2.5, "wall_s", window=2) == 1.0
    assert math.isnan(late_return(run, 5))
