"""The evaluate stage: mean@1 / avg@k / pass@k / maj@k by hand, grading through verify, the stage CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from fixtures import synthetic_prompts
from tcrlsd.artifacts import read_artifact, write_artifact
from tcrlsd.evaluate import EvaluateParams, evaluation_metrics, evaluation_rows, val_prompt_ids
from tcrlsd.evaluate.core import grade_eval_rows
from tcrlsd.evaluate.votes import majority_score, vote_key
from tcrlsd.generation import Completion
from tcrlsd.params import ParamsError, from_mapping
from tcrlsd.schemas import SchemaError, schema_for
from tcrlsd.verify import VerifyParams

ROOT = Path(__file__).resolve().parents[1]


def _prompts(n_train: int, n_val: int) -> pa.Table:
    return synthetic_prompts(n_train, n_val, seed=11, source=lambda i: "synthetic" if i % 2 else "other")


def _c(text: str) -> Completion:
    return Completion(token_ids=tuple(range(len(text) % 7 + 1)), text=text, finish_reason="stop")


def test_val_ids_are_sorted_and_capped():
    prompts = _prompts(2, 3)
    assert val_prompt_ids(prompts, None) == ["synthetic/val/2", "synthetic/val/3", "synthetic/val/4"]
    assert val_prompt_ids(prompts, 2) == ["synthetic/val/2", "synthetic/val/3"]
    with pytest.raises(SchemaError, match="no rows with split == 'val'"):
        val_prompt_ids(prompts.filter(pa.compute.equal(prompts["split"], "train")), None)



def test_the_test_split_is_evaluated_only_when_asked():
    prompts = _prompts(2, 3)
    split = pa.array(["train", "train", "val", "test", "test"])
    prompts = prompts.set_column(prompts.schema.get_field_index("split"), "split", split)
    assert val_prompt_ids(prompts, None) == ["synthetic/val/2"]
    assert val_prompt_ids(prompts, None, split="test") == ["synthetic/val/3", "synthetic/val/4"]
    assert EvaluateParams(split="test").split == "test"
    with pytest.raises(ValueError, match="evaluate.split must be val or test"):
        EvaluateParams(split="train")
    with pytest.raises(SchemaError, match="no rows with split == 'test'.*add a test source"):
        val_prompt_ids(_prompts(2, 3), None, split="test")


def test_metrics_by_hand_through_the_real_graders():
    prompts = _prompts(2, 3)
    ids = val_prompt_ids(prompts, None)
    gold = dict(zip(prompts["prompt_id"].to_pylist(), prompts["answer"].to_pylist()))
    right = {pid: _c(f"so \\boxed{{{gold[pid]}}}") for pid in ids}
    wrong = _c("so \\boxed{-12345}")
    none = _c("no answer here")
    # greedy: right, wrong, right -> mean@1 = 2/3
    greedy = [right[ids[0]], wrong, right[ids[2]]]
    # 4 samples: prompt 0 has 1/4 right, prompt 1 has 0/4, prompt 2 has 4/4
    # avg@4 = (0.25 + 0 + 1) / 3 = 0.41667; pass@4 = 2/3
    sampled = [[right[ids[0]], wrong, none, wrong], [wrong] * 4, [right[ids[2]]] * 4]
    cols = evaluation_rows(ids, greedy, sampled)
    grade_eval_rows(cols, prompts, VerifyParams(workers=1), None)
    table = pa.Table.from_pydict(cols, schema=schema_for("evaluations"))
    m = evaluation_metrics(table, prompts, EvaluateParams(samples=4))
    assert m["prompts"] == 3
    assert m["greedy_mean_at_1"] == pytest.approx(2 / 3)
    assert m["avg_at_k"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert m["pass_at_k"] == pytest.approx(2 / 3)
    # maj@4: prompt 0 votes right 1, "-12345" 2 (the no-answer sample abstains) -> 0; prompt 1 -> 0;
    # prompt 2 right 4 -> 1; (0 + 0 + 1) / 3
    assert m["maj_at_k"] == pytest.approx(1 / 3)
    assert table.column("extracted_answer").to_pylist()[:5] == [gold[ids[0]], gold[ids[0]], "-12345", None, "-12345"]
    assert m["reasons"]["sampled/no_answer"] == 1
    # sources alternate: val/2 other, val/3 synthetic, val/4 other
    assert m["by_source"]["other"]["greedy_mean_at_1"] == 1.0
    assert m["by_source"]["synthetic"]["avg_at_k"] == 0.0
    assert m["by_source"]["synthetic"]["maj_at_k"] == 0.0 and m["by_source"]["other"]["maj_at_k"] == 0.5
    assert set(m["by_level"]) <= {"1", "2", "3", "4"}
    assert sum(v["prompts"] for v in m["by_level"].values()) == 3
    assert len(set(cols["eval_id"])) == len(cols["eval_id"]) == 3 * 5


def test_params_validate():
    with pytest.raises(ParamsError, match="temperature"):
        from_mapping(EvaluateParams, {"samples": 4, "sampling": {"temperature": 0.0}}, "evaluate")
    from_mapping(EvaluateParams, {"samples": 0, "sampling": {"temperature": 0.0}}, "evaluate")  # greedy only is fine
    with pytest.raises(ParamsError, match="unknown key"):
        from_mapping(EvaluateParams, {"n": 32}, "evaluate")


def test_shipped_params_section_loads():
    import yaml

    from_mapping(EvaluateParams, yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"], "evaluate")


def test_stage_cli_writes_a_valid_resumable_artifact(tmp_path, tiny_policy):
    prompts = tmp_path / "prompts.parquet"
    write_artifact(_prompts(2, 4), prompts, "prompts")
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  samples: 2\n  sampling: {max_new_tokens: 8}\n  num_parts: 2\n  num_threads: 1\n"
                      "verify:\n  workers: 1\n")
    out, metrics = tmp_path / "evals", tmp_path / "evaluate.json"
    cmd = [sys.executable, str(ROOT / "stages" / "evaluate.py"), "--params", str(params), "--prompts", str(prompts),
           "--policy", str(tiny_policy), "--out", str(out), "--metrics", str(metrics), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    table = read_artifact(out, "evaluations")
    assert table.num_rows == 4 * (1 + 2)
    assert table["decoding"].to_pylist().count("greedy") == 4
    m = json.loads(metrics.read_text())
    assert m["complete"] and m["prompts"] == 4 and m["parts_evaluated_now"] == 2
    first = (out / "part-00000.parquet").read_bytes()
    # a rerun with the same inputs keeps the finished parts; a deleted part is redone byte-identically
    (out / "part-00000.parquet").unlink()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    assert json.loads(metrics.read_text())["parts_evaluated_now"] == 1
    assert (out / "part-00000.parquet").read_bytes() == first
    # other params with finished parts on disk: a clear error naming --restart, no traceback, nothing deleted
    (out / "part-00000.parquet").unlink()
    params.write_text(params.read_text().replace("max_new_tokens: 8", "max_new_tokens: 9"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("evaluate: error:"), proc.stderr
    assert "Traceback" not in proc.stderr and "--restart" in proc.stderr
    assert (out / "part-00001.parquet").exists()


def test_vote_key_normalises_only_spelling():
    assert vote_key(" \\dfrac{1}{2} ") == vote_key("\\frac{1}{2}") == "\\frac{1}{2}"
    assert vote_key("$18.50$") == vote_key("18.5") == "18.5"
    assert vote_key("-0.0") == vote_key("0") == "0"
    assert vote_key("x = 3.") == "x=3"
    assert vote_key("\\left( 1, 2 \\right)") == "(1,2)"
    assert vote_key("1,22") == "1,22" != vote_key("122")  # a list of two numbers, never 122
    assert vote_key(None) is None and vote_key("  ") is None


@pytest.mark.parametrize("samples, expected", [
    # (extracted_answer, reward) of the k samples of one prompt -> maj@k of that prompt
    ([("7", 1.0), ("7", 1.0), ("5", 0.0), ("4", 0.0)], 1.0),  # right 2 vs 1 + 1
    ([("7", 1.0), ("5", 0.0), ("5.0", 0.0), ("4", 0.0)], 0.0),  # wrong "5" 2 (5.0 is 5) vs right 1
    # correct samples are one class however they are written (all equal the gold): 2 vs 1 + 1
    ([("1/2", 1.0), ("0.5", 1.0), ("3", 0.0), ("4", 0.0)], 1.0),
    ([("7", 1.0), ("7", 1.0), ("5", 0.0), (" 5 ", 0.0)], 0.5),  # tie of two classes: half
    ([("7", 1.0), ("5", 0.0), ("4", 0.0), ("3", 0.0)], 0.25),  # four singletons: a quarter
    ([("7", 1.0), (None, 0.0), (None, 0.0), (None, 0.0)], 1.0),  # no answer does not vote
    ([(None, 0.0), (None, 0.0)], 0.0),  # nobody voted
    ([("5", 0.0), ("5", 0.0), ("4", 0.0)], 0.0),  # nothing right
])
def test_majority_score_hand_table(samples, expected):
    assert majority_score(samples) == pytest.approx(expected)
    assert majority_score(list(reversed(samples))) == pytest.approx(expected)  # order never matters
