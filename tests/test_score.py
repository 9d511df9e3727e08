"""Score stage: batched log-probs vs a per-sequence reference, copying teacher, the CLI end to end."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest

from fixtures import critiques_table, rollouts_table
from tcrlsd.artifacts import read_artifact, write_artifact
from tcrlsd.schemas import schema_for, validate
from tcrlsd.score import (
    ScoreParams,
    build_inputs,
    plan_batches,
    response_logprobs,
    score_metrics,
    score_part,
)

torch = pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def _reference(model, context, response, shifts=(0,)):
    """Plain unbatched, unpadded forward of one sequence: log_softmax, gather.

    Response token t sits at index len(context) + t and is predicted by the logits one position
    earlier; shift 1 reads the logits at the token's own position (the off-by-one bug). One array
    per shift (a bare array for the default).
    """
    ids = torch.tensor([list(context) + list(response)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (T, V)
    out = []
    for shift in shifts:
        pos = torch.arange(len(context) - 1, len(context) - 1 + len(response)) + shift
        out.append(logp[pos.clamp(max=ids.shape[1] - 1), torch.tensor(response)].numpy())
    return out[0] if shifts == (0,) else out


def _load(path, seed=None):
    from tcrlsd.policy import load_policy

    model, tok = load_policy(path, device="cpu", dtype="float32")
    if seed is not None:  # a different set of weights for the 'lagged' teacher
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for p in model.parameters():
                p.data.add_(0.05 * torch.randn_like(p))
    return model, tok


def _tables(tok, n=12, seed=0, with_feedback=lambda i: i % 3 != 0):
    """Small rollouts and critiques tables: real prompts, random response ids, some null feedback."""
    from tcrlsd.policy import encode_prompt
    from tcrlsd.synthetic import make_problems

    rng = random.Random(seed)
    probs = make_problems(n, seed=seed)
    vocab = len(tok)
    rows, crits = [], []
    for i, p in enumerate(probs):
        rid = f"p{i // 2}#{i % 2}"
        resp = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 24))]
        if i == 4:
            resp = []  # an empty response (EOS first) is legal: zero-length log-prob lists
        rows.append(dict(rollout_id=rid, prompt_id=f"p{i // 2}", sample_idx=i % 2, iteration=0,
                         prompt_token_ids=encode_prompt(tok, p.problem), response_token_ids=resp,
                         response_text=tok.decode(resp), finish_reason="stop"))
        fb = f"Feedback: the second step is wrong. {p.solution[:20]}" if with_feedback(i) else None
        crits.append(dict(rollout_id=rid, mode="critique", critic="reference", feedback_text=fb, template="t@v1",
                          teacher_prompt=None if fb is None else f"{p.problem}\n{fb}\nSolve it again.",
                          error=None, leaks_answer=False, suspected_false_negative=False))
    rollouts = rollouts_table(rows)
    critiques = critiques_table(crits)
    return rollouts, critiques


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_batches_covers_every_sequence_within_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 80))]
    budget = rng.choice([64, 500, 2048])
    batches = plan_batches(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= budget or len(b) == 1  # only a lone over-budget sequence may exceed it
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("seed,budget,chunk", [(0, 64, 5), (1, 256, 1024), (2, 10_000, 3)])
def test_batched_logprobs_match_unpadded_reference(tiny_policy, seed, budget, chunk):
    model, tok = _load(tiny_policy)
    rng = random.Random(seed)
    vocab = len(tok)
    contexts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))] for _ in range(14)]
    responses = [[rng.randrange(vocab) for _ in range(rng.randint(0, 50))] for _ in range(14)]
    got = response_logprobs(model, contexts, responses, max_tokens_per_batch=budget, logits_chunk_tokens=chunk)
    shifted_diffs = []
    for c, r, lp in zip(contexts, responses, got):
        assert lp.dtype == np.float32 and lp.shape == (len(r),)
        if not r:
            continue
        ref, ref_shifted = _reference(model, c, r, shifts=(0, 1))
        np.testing.assert_allclose(lp, ref, atol=1e-5, rtol=0)
        shifted_diffs.append(np.max(np.abs(lp - ref_shifted)))
    # The same check against logits one position off fails by a wide margin: the test has teeth.
    assert min(shifted_diffs) > 1e-2


def test_hand_built_shift_case(tiny_policy):
    """One response token after a one-token context: only logits[0] may be used."""
    model, tok = _load(tiny_policy)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 17]])).logits[0]  # (2, V)
    expected = torch.log_softmax(logits[0], -1)[17].item()  # p(17 | 5)
    wrong = torch.log_softmax(logits[1], -1)[17].item()  # p(next = 17 | 5, 17): off by one
    (got,) = response_logprobs(model, [[5]], [[17]], max_tokens_per_batch=8)
    assert got[0] == pytest.approx(expected, abs=1e-6)
    assert abs(got[0] - wrong) > 1e-3


@pytest.mark.parametrize("teacher_mode", ["current", "lagged"])
def test_student_and_teacher_match_reference(tiny_policy, teacher_mode):
    from tcrlsd.policy import encode_prompt

    student, tok = _load(tiny_policy)
    teacher = _load(tiny_policy, seed=7)[0] if teacher_mode == "lagged" else None
    rollouts, critiques = _tables(tok, n=10, seed=3)
    inputs = build_inputs(rollouts, critiques).part(range(10))
    params = ScoreParams(max_tokens_per_batch=96, logits_chunk_tokens=7)
    table, counts = score_part(inputs, student, teacher, tok, params, "ckpt")
    t_model = teacher if teacher is not None else student
    assert table.column("teacher_checkpoint").to_pylist() == ["ckpt"] * len(inputs)
    for i, row in enumerate(table.to_pylist()):
        resp = inputs.responses[i]
        assert row["rollout_id"] == inputs.rollout_ids[i]
        assert len(row["student_logprobs"]) == len(row["teacher_logprobs"]) == len(resp)
        if not resp:
            continue
        np.testing.assert_allclose(row["student_logprobs"], _reference(student, inputs.prompts[i], resp), atol=1e-5)
        if inputs.teacher_prompts[i] is None:
            assert row["teacher_logprobs"] == row["student_logprobs"]  # copied, bit for bit
        else:
            ctx = encode_prompt(tok, inputs.teacher_prompts[i])
            np.testing.assert_allclose(row["teacher_logprobs"], _reference(t_model, ctx, resp), atol=1e-5)
            assert row["teacher_logprobs"] != row["student_logprobs"]


def _with_wrong_hints(critiques: pa.Table, k: int = 2) -> pa.Table:
    """critiques plus k extra teacher contexts per row: text on rows with feedback, except one
    missing hint (row 1, slot 1: a critic failure), None on rows without feedback."""
    texts = []
    for i, tp in enumerate(critiques.column("teacher_prompt").to_pylist()):
        texts.append([None if tp is None or (i, j) == (1, 1) else f"{tp[:30]}\nWrong hint {j}: step {j + 2} is off."
                      for j in range(k)])
    strings = pa.list_(pa.string())
    return (critiques.append_column("extra_teacher_prompts", pa.array(texts, strings))
            .append_column("extra_teacher_kinds", pa.array([["wrong_hint"] * k] * len(texts), strings))
            .append_column("extra_hint_prompt_ids", pa.array([[None] * k] * len(texts), strings)))


@pytest.mark.parametrize("teacher_mode", ["current", "lagged"])
def test_extra_teacher_contexts_each_match_a_direct_forward(tiny_policy, teacher_mode):
    from tcrlsd.policy import encode_prompt

    student, tok = _load(tiny_policy)
    teacher = _load(tiny_policy, seed=7)[0] if teacher_mode == "lagged" else None
    t_model = teacher if teacher is not None else student
    rollouts, critiques = _tables(tok, n=10, seed=3)
    params = ScoreParams(max_tokens_per_batch=96, logits_chunk_tokens=7)
    part = build_inputs(rollouts, _with_wrong_hints(critiques)).part(range(10))  # K = 3
    assert build_inputs(rollouts, _with_wrong_hints(critiques)).extra_contexts == 2
    table, counts = score_part(part, student, teacher, tok, params, "ckpt")
    assert table.column_names[-2:] == ["extra_teacher_logprobs", "extra_teacher_kinds"]
    validate(table, "scores")
    one, one_counts = score_part(build_inputs(rollouts, critiques).part(range(10)), student, teacher, tok, params, "ckpt")
    assert one.schema == schema_for("scores")  # K = 1: the columns of before, nothing added
    extra_tokens = 0
    for i, row in enumerate(table.to_pylist()):
        resp = part.responses[i]
        assert row["extra_teacher_kinds"] == ["wrong_hint", "wrong_hint"]
        np.testing.assert_allclose(row["teacher_logprobs"], one.column("teacher_logprobs")[i].as_py(), atol=1e-5)
        for j, (text, lp) in enumerate(zip(part.extra_teacher_prompts[i], row["extra_teacher_logprobs"])):
            assert len(lp) == len(resp)
            if text is None:
                assert lp == row["student_logprobs"]  # no text: the student's, bit for bit
            elif resp:
                ctx = encode_prompt(tok, text)
                extra_tokens += len(ctx) + len(resp)
                np.testing.assert_allclose(lp, _reference(t_model, ctx, resp), atol=1e-5, err_msg=f"row {i} ctx {j}")
                assert lp != row["teacher_logprobs"]  # another context, another distribution
    assert extra_tokens > 0 and counts["forward_tokens"] == one_counts["forward_tokens"] + extra_tokens


def test_stage_cli_with_three_teacher_contexts(tiny_policy, tmp_path):
    _, tok = _load(tiny_policy)
    rollouts, critiques = _tables(tok, n=12)
    write_artifact(rollouts, tmp_path / "rollouts.parquet", "rollouts")
    write_artifact(_with_wrong_hints(critiques), tmp_path / "critiques.parquet", "critiques")
    _params(tmp_path)
    assert _stage_main(_args(tmp_path, tiny_policy, tmp_path / "scores")) == 0
    scores = read_artifact(tmp_path / "scores", "scores")  # validates the optional columns too
    assert scores.column("extra_teacher_logprobs").type == pa.list_(pa.list_(pa.float32()))
    metrics = json.loads((tmp_path / "metrics" / "scores.json").read_text())
    assert metrics["run"]["teacher_contexts"] == 3


# ----------------------------------------------------------------------------- a teacher that can copy


@pytest.fixture(scope="module")
def copy_model(tiny_policy):
    """The tiny policy briefly trained to repeat: BOS + A + A with A ten random digits.

    A random-weight model cannot copy, so 'feedback containing the response makes the teacher more
    confident' would be untestable with it. A fixed-length repeat is learnt in ~100 steps (a head
    attending ten positions back); the training stops as soon as the loss on the copy is low.
    """
    model, tok = _load(tiny_policy)
    digits = torch.tensor(tok.convert_tokens_to_ids([str(d) for d in range(10)]))
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    L = 10
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is much faster than two fighting a busy machine
    try:
        loss, step = _train_copy(model, opt, digits, tok.bos_token_id, L, gen)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    assert loss < 0.5, f"copy training did not converge (loss {loss:.3f} after {step + 1} steps)"
    return model, tok, digits.tolist()


def _train_copy(model, opt, digits, bos, L, gen):
    for step in range(400):
        a = digits[torch.randint(0, 10, (32, L), generator=gen)]  # (B, L)
        x = torch.cat([torch.full((32, 1), bos), a, a], dim=1)  # (B, 2L+1)
        logits = model(x).logits[:, L:-1]  # positions predicting the second copy
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, L + 1 :].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    return loss.item(), step


def test_teacher_with_verbatim_response_in_feedback_is_more_confident(copy_model):
    from tcrlsd.policy import encode_prompt

    model, tok, digits = copy_model
    rng = random.Random(11)
    rows, crits = [], []
    for i in range(16):
        a = [rng.choice(digits) for _ in range(10)]
        b = [rng.choice(digits) for _ in range(10)]
        # Student sees BOS + B (other digits), teacher sees BOS + A: the feedback is the response itself;
        # the contexts have the same length so only their content differs.
        shown = a if i % 2 == 0 else [rng.choice(digits) for _ in range(10)]
        feedback = tok.decode(shown)
        assert encode_prompt(tok, feedback) == [tok.bos_token_id] + shown  # digits re-encode one per token
        rows.append(dict(rollout_id=f"c#{i}", prompt_token_ids=[tok.bos_token_id] + b, response_token_ids=a))
        crits.append(dict(rollout_id=f"c#{i}", feedback_text=feedback, teacher_prompt=feedback))
    rollouts = pa.Table.from_pylist(rows)
    critiques = pa.Table.from_pylist(crits)
    inputs = build_inputs(rollouts, critiques)
    table, _ = score_part(inputs.part(range(16)), model, None, tok, ScoreParams(), "copy")
    res = table.to_pylist()
    delta_verbatim = np.array([np.subtract(r["teacher_logprobs"], r["student_logprobs"]) for r in res[0::2]])
    delta_other = np.array([np.subtract(r["teacher_logprobs"], r["student_logprobs"]) for r in res[1::2]])
    assert (delta_verbatim > 0).mean() > 0.9  # nearly every copied token gains
    assert delta_verbatim.mean() > 1.0  # by more than a nat on average
    assert abs(delta_other.mean()) < 0.5 * delta_verbatim.mean()  # unrelated feedback: no such gain


# ----------------------------------------------------------------------------- the stage through its CLI


def _write_inputs(tmp_path, tok, **kw):
    rollouts, critiques = _tables(tok, **kw)
    write_artifact(rollouts, tmp_path / "rollouts.parquet", "rollouts")
    write_artifact(critiques, tmp_path / "critiques.parquet", "critiques")
    return rollouts, critiques


def _params(tmp_path, **over):
    body = {"max_tokens_per_batch": 200, "rows_per_part": 4, "logits_chunk_tokens": 16, "device": "cpu",
            "dtype": "auto", **over}
    p = tmp_path / "params.yaml"
    p.write_text("other: {x: 1}\nscore:\n" + "".join(f"  {k}: {v}\n" for k, v in body.items()))
    return p


def _args(tmp_path, policy, out, **extra):
    args = ["--params", str(tmp_path / "params.yaml"), "--rollouts", str(tmp_path / "rollouts"),
            "--critiques", str(tmp_path / "critiques"), "--policy", str(policy), "--out", str(out),
            "--metrics", str(tmp_path / "metrics" / f"{Path(out).name}.json"), "--no-progress"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _stage_main(argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("score_stage", REPO / "stages" / "score.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def _stage_fails(capsys, pattern, argv):
    """The stage exits 2 with one ``score: error: ...`` line matching ``pattern`` (no traceback)."""
    import re

    capsys.readouterr()
    assert _stage_main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err) and "Traceback" not in err, err


def _part_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("part-*.parquet"))}


def test_stage_cli_writes_scores_reruns_identically_and_resumes(tiny_policy, tmp_path):
    _, tok = _load(tiny_policy)
    rollouts, critiques = _write_inputs(tmp_path, tok, n=12)
    _params(tmp_path)
    out = tmp_path / "scores"
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "score.py"), *_args(tmp_path, tiny_policy, out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    scores = read_artifact(out, "scores")  # validates the schema
    assert scores.num_rows == 12 and len(_part_bytes(out)) == 3  # 12 rows / 4 per part
    assert scores.column("rollout_id").to_pylist() == rollouts.column("rollout_id").to_pylist()
    has_fb = [t is not None for t in critiques.column("teacher_prompt").to_pylist()]
    assert not all(has_fb) and any(has_fb)
    for row, fb in zip(scores.to_pylist(), has_fb):
        if not fb:
            assert row["teacher_logprobs"] == row["student_logprobs"]
    assert set(scores.column("teacher_checkpoint").to_pylist()) == {str(tiny_policy)}
    metrics = json.loads((tmp_path / "metrics" / "scores.json").read_text())
    assert metrics["rollouts"] == 12 and metrics["rollouts_with_feedback"] == sum(has_fb)
    assert metrics["teacher_equals_student_without_feedback"] is True
    assert metrics["delta_gap"] is not None and metrics["run"]["tokens_per_s"] > 0
    assert sum(b["tokens"] for b in metrics["delta_by_relative_decile"]) == metrics["feedback_response_tokens"]
    assert sum(b["tokens"] for b in metrics["delta_by_position"]) == metrics["feedback_response_tokens"]
    first = _part_bytes(out)

    # A fresh run into another folder gives the same bytes.
    assert _stage_main(_args(tmp_path, tiny_policy, tmp_path / "again")) == 0
    assert _part_bytes(tmp_path / "again") == first

    # Resume: delete one part; the rerun recomputes only it, and the bytes match.
    (out / "part-00001.parquet").unlink()
    mtime0 = (out / "part-00000.parquet").stat().st_mtime_ns
    assert _stage_main(_args(tmp_path, tiny_policy, out)) == 0
    assert _part_bytes(out) == first
    assert (out / "part-00000.parquet").stat().st_mtime_ns == mtime0  # kept, not recomputed
    resumed = json.loads((tmp_path / "metrics" / "scores.json").read_text())
    assert resumed["run"]["parts_done"] == 1 and resumed["run"]["parts_skipped"] == 2

    # Two shards of workers fill one folder between them; the result is the same artifact.
    for i in range(2):
        assert _stage_main(_args(tmp_path, tiny_policy, tmp_path / "sharded", shard=f"{i}/2")) == 0
    assert _part_bytes(tmp_path / "sharded") == first


def test_stage_lagged_teacher_uses_the_given_checkpoint(tiny_policy, tmp_path, capsys):
    import shutil

    from tcrlsd.policy import save_policy

    model, tok = _load(tiny_policy, seed=3)
    teacher_dir = save_policy(model, tok, tmp_path / "teacher")
    _write_inputs(tmp_path, tok, n=6)
    _params(tmp_path, teacher="lagged")
    assert _stage_main(_args(tmp_path, tiny_policy, tmp_path / "s", teacher_policy=teacher_dir)) == 0
    scores = read_artifact(tmp_path / "s", "scores")
    assert set(scores.column("teacher_checkpoint").to_pylist()) == {str(teacher_dir)}
    # Without --teacher-policy: the teacher kept in the policy's folder (as the update writes it) ...
    kept = tmp_path / "policy-with-teacher"
    shutil.copytree(tiny_policy, kept)
    shutil.copytree(teacher_dir, kept / "teacher")
    assert _stage_main(_args(tmp_path, kept, tmp_path / "k")) == 0
    by_kept = read_artifact(tmp_path / "k", "scores")
    assert set(by_kept.column("teacher_checkpoint").to_pylist()) == {str(kept / "teacher")}
    assert by_kept.column("teacher_logprobs").to_pylist() == scores.column("teacher_logprobs").to_pylist()
    # ... and a policy without one is its own teacher (before the first update: the starting policy)
    assert _stage_main(_args(tmp_path, tiny_policy, tmp_path / "own")) == 0
    own = read_artifact(tmp_path / "own", "scores")
    assert set(own.column("teacher_checkpoint").to_pylist()) == {str(tiny_policy)}
    _params(tmp_path)  # teacher: current
    assert _stage_main(_args(tmp_path, tiny_policy, tmp_path / "c")) == 0
    current = read_artifact(tmp_path / "c", "scores")
    # the policy as its own teacher scores exactly as `current` does (same pooled batches)
    assert own.column("teacher_logprobs").to_pylist() == current.column("teacher_logprobs").to_pylist()
    assert own.column("student_logprobs").to_pylist() == current.column("student_logprobs").to_pylist()
    # Same student weights; only the batch mix differs (current pools teacher sequences in), so equal up
    # to float summation order.
    np.testing.assert_allclose(pa.compute.list_flatten(current.column("student_logprobs")).to_numpy(),
                               pa.compute.list_flatten(scores.column("student_logprobs")).to_numpy(), atol=1e-5)
    assert current.column("teacher_logprobs").to_pylist() != scores.column("teacher_logprobs").to_pylist()
    _stage_fails(capsys, "'current'", _args(tmp_path, tiny_policy, tmp_path / "c", teacher_policy=teacher_dir))


def test_stage_mismatched_inputs_fail_clearly(tiny_policy, tmp_path, capsys):
    _, tok = _load(tiny_policy)
    rollouts, critiques = _tables(tok, n=6)
    write_artifact(rollouts, tmp_path / "rollouts.parquet", "rollouts")
    write_artifact(critiques.slice(0, 5), tmp_path / "critiques.parquet", "critiques")
    _params(tmp_path)
    _stage_fails(capsys, r"critiques.parquet: critiques has no row for 1 rollout.*'p2#1'", _args(tmp_path, tiny_policy, tmp_path / "s"))
    bad = critiques.set_column(5, "teacher_prompt", pa.array([None] * 6, pa.string()))
    write_artifact(bad, tmp_path / "critiques.parquet", "critiques")
    _stage_fails(capsys, "rollout_id 'p0#1': feedback_text is set but teacher_prompt is null", _args(tmp_path, tiny_policy, tmp_path / "s"))
    # Rollouts from a model with a bigger vocabulary: named, not an index error deep in torch.
    big = rollouts.set_column(5, "response_token_ids", pa.array([[10_000]] * 6, pa.list_(pa.int32())))
    write_artifact(big, tmp_path / "rollouts.parquet", "rollouts")
    write_artifact(critiques, tmp_path / "critiques.parquet", "critiques")
    _stage_fails(capsys, "outside the vocabulary", _args(tmp_path, tiny_policy, tmp_path / "s"))
    assert not list((tmp_path / "s").glob("part-*.parquet"))


def test_metrics_hand_computed():
    """Delta per position of two feedback rows and one without, computed by hand."""
    scores = pa.table({
        "rollout_id": ["a", "b", "c"],
        "student_logprobs": [[-1.0, -2.0], [-1.0, -1.0, -1.0, -1.0], [-3.0]],
        "teacher_logprobs": [[-0.5, -2.5], [-1.0, -0.0, -1.0, -1.0], [-3.0]],
        "teacher_checkpoint": ["x"] * 3,
    })
    has_fb = np.array([True, True, False])
    m = score_metrics([(scores, has_fb)])
    # deltas: a: +0.5, -0.5; b: 0, +1, 0, 0  -> token mean 1.0 / 6; row means 0 and 0.25
    assert m["delta_gap"] == pytest.approx(1 / 6)
    assert m["delta_gap_row_mean"] == pytest.approx(0.125)
    assert m["delta_std"] == pytest.approx(np.std([0.5, -0.5, 0, 1, 0, 0]))
    assert m["feedback_response_tokens"] == 6 and m["rollouts_with_feedback"] == 2
    assert m["critique_coverage"] == pytest.approx(2 / 3)
    dec = {b["bucket"]: b for b in m["delta_by_relative_decile"]}
    # a: t=0 -> decile 0, t=1 -> decile 5; b: t=0,1,2,3 -> deciles 0, 2, 5, 7
    assert dec["0.0-0.1"]["tokens"] == 2 and dec["0.0-0.1"]["mean_delta"] == pytest.approx(0.25)
    assert dec["0.5-0.6"]["tokens"] == 2 and dec["0.5-0.6"]["mean_delta"] == pytest.approx(-0.25)
    assert dec["0.2-0.3"]["mean_delta"] == pytest.approx(1.0) and dec["0.1-0.2"]["mean_delta"] is None
    assert m["delta_by_position"][0] == {"bucket": "0-15", "tokens": 6, "mean_delta": pytest.approx(1 / 6)}
    assert m["teacher_equals_student_without_feedback"] is True
    # Folded part by part (the stage reads one part file at a time), every cut gives the same metrics.
    for cut in (1, 2):
        split = score_metrics([(scores.slice(0, cut), has_fb[:cut]), (scores.slice(cut), has_fb[cut:])])
        assert _approx_equal(split, m), (cut, split, m)


def _approx_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_approx_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_approx_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, abs=1e-12)
    return a == b


# ----------------------------------------------------------------------------- K contexts through the stages


def test_wrong_hints_through_critique_score_and_rlcsd(reliability_iteration, tmp_path):
    """critique (wrong_hints: 2) -> score (K = 3) -> advantages (rlcsd), each stage through its main,
    on the harness iteration's rollouts; then `tcrlsd recompute -e rlcsd` reproduces the stage."""
    import shutil

    from typer.testing import CliRunner

    from harness import run_stage, stage_argv, write_params
    from tcrlsd.cli import app

    src = reliability_iteration
    for name in ("prompts.parquet", "rollouts", "verdicts.parquet"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, tmp_path / name)
    params = write_params(tmp_path, critique={"wrong_hints": 2}, advantages={"estimator": "rlcsd"})
    for stage in ("critique", "score", "advantages"):
        assert run_stage(stage, stage_argv(stage, tmp_path, tmp_path, src / "policy", params)) == 0, stage
    scores = read_artifact(tmp_path / "scores", "scores")
    critiques = read_artifact(tmp_path / "critiques", "critiques")
    has_fb = critiques.column("teacher_prompt").is_valid().to_pylist()
    assert any(has_fb)
    for row, fb, texts in zip(scores.to_pylist(), has_fb, critiques.column("extra_teacher_prompts").to_pylist()):
        assert len(row["extra_teacher_logprobs"]) == 2
        assert (texts != [None, None]) == fb  # wrong hints exactly where there is a correct one
        if not fb:
            assert row["extra_teacher_logprobs"] == [row["student_logprobs"]] * 2
    metrics = json.loads((tmp_path / "metrics" / "advantages.json").read_text())
    assert metrics["estimator"] == "rlcsd" and metrics["teacher_contexts"] == 3
    res = CliRunner().invoke(app, ["recompute", str(tmp_path), "--params", str(params), "-e", "rlcsd",
                                   "--out", str(tmp_path / "re.parquet")])
    assert res.exit_code == 0, res.output
    assert read_artifact(tmp_path / "re.parquet", "advantages").equals(read_artifact(tmp_path / "advantages.parquet",
                                                                                      "advantages"))
    # inspect shows every context of a sample: the texts, and log Q − log Q_wrong per wrong hint
    rid = critiques.column("rollout_id")[has_fb.index(True)].as_py()
    res = CliRunner().invoke(app, ["inspect", str(tmp_path), "--id", rid, "--policy", str(src / "policy")])
    assert res.exit_code == 0, res.output
    assert "Extra teacher context 1: wrong_hint (exact)" in res.stdout and "log Q − log Q_wrong" in res.stdout
    res = CliRunner().invoke(app, ["inspect", str(tmp_path), "--id", rid, "--format", "jsonl"])
    sample = json.loads(res.stdout)
    assert len(sample["stats"]["hint_gaps"]) == 2 and "extra_teacher_logprobs" not in sample["score"]
    assert sample["critique"]["extra_teacher_prompts"] == critiques.column("extra_teacher_prompts")[
        has_fb.index(True)].as_py()
