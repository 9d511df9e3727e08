"""The report's plateau and cost columns (tcrlsd/loop/compute.py), on hand-made workspaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tcrlsd.loop.compute import compute_lines, plateau_iteration, run_cost


@pytest.mark.parametrize("curve, want", [
    ([(0, 0.60), (1, 0.70), (2, 0.705), (3, 0.70)], (1, True)),   # within 1 point of 0.705 from iteration 1
    ([(0, 0.60), (1, 0.65), (2, 0.70)], (None, False)),            # last step rose 5 points: still rising
    ([(0, 0.60), (1, 0.65), (2, 0.655)], (1, True)),               # last step +0.5: plateau at 1
    ([(0, 0.70), (1, 0.60), (2, 0.61)], (0, True)),                # best first, then worse
    ([(0, 0.5)], (0, True)),
    ([], (None, False)),
])
def test_plateau_iteration(curve, want):
    assert plateau_iteration(curve) == want


def _workspace(ws: Path, tokens: list[int], wall: float, warm: float | None = None) -> None:
    for i, n in enumerate(tokens):
        d = ws / "data" / "metrics" / f"iter-{i:04d}"
        d.mkdir(parents=True)
        (d / "generate.json").write_text(json.dumps({"response_tokens": n}))
    (ws / "wall.json").write_text(json.dumps({"seconds": wall}))
    if warm is not None:  # this run ran the shared warm start: its time is not the run's
        (ws / "repro.log").write_text("Running stage 'prepare':\nRunning stage 'warmstart':\n")
        (ws / "data" / "metrics" / "warmstart.json").write_text(json.dumps({"train_seconds": warm - 10,
                                                                          "eval_seconds": 10}))


def test_run_cost_leaves_out_the_warm_start(tmp_path):
    _workspace(tmp_path / "a", [1000, 2000], wall=900.0, warm=600.0)
    _workspace(tmp_path / "b", [1500], wall=300.0)
    assert run_cost(tmp_path / "a") == {"tokens": 3000, "seconds": 300.0}
    assert run_cost(tmp_path / "b") == {"tokens": 1500, "seconds": 300.0}
    assert run_cost(tmp_path / "none") == {"tokens": None, "seconds": None}


def test_compute_lines_divide_cost_by_gain(tmp_path):
    # grpo: +10 points for 4k tokens and 5 min per run; hybrid: +20 points, same tokens, 10 min
    rows = []
    for preset, curve in (("grpo", [0.50, 0.55, 0.60, 0.60]), ("hybrid", [0.50, 0.60, 0.70, 0.70])):
        for seed in (0, 1):
            _workspace(tmp_path / "runs" / f"{preset}-s{seed}", [2000, 2000], wall=300.0 if preset == "grpo" else 600.0)
            rows += [{"preset": preset, "seed": seed, "iteration": i - 1, "val_greedy": v} for i, v in enumerate(curve)]
    text = "\n".join(compute_lines(tmp_path, rows, ["grpo", "hybrid"],
                                   {p: [f"{p}-s0", f"{p}-s1"] for p in ("grpo", "hybrid")}))
    assert "| grpo | 1 | 10.0 | 4 | 5.0 | 0 | 0.50 |" in text
    assert "| hybrid | 1 | 20.0 | 4 | 10.0 | 0 | 0.50 |" in text
    assert compute_lines(tmp_path, [], ["grpo"], {}) == []
