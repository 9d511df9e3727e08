"""What drew the rollouts, and where the sampler's log-probs are the score stage's own numbers.

The generate stage records on every rollout what drew it (``rollouts.sampler``, :func:`sampler_record`: backend, device, dtype,
temperature, top_p and the content digest of the policy folder). Sampled by the transformers backend
in float32 on CPU from the very checkpoint the score stage scores with, at temperature 1 and top_p 1
(or greedily: the raw log-softmax), ``sampler_logprobs`` is log pi(y_t | x, y_<t) computed by the
same model in the same precision -- only the KV-cached, left-padded decode differs from the score
stage's one full forward (measured: <= 1e-5, tests/test_score_reuse.py) -- so the score stage may take
it as ``student_logprobs`` and skip the student forward (``score.reuse_sampler_logprobs``). Anything
else is not: vLLM's kernels, bf16, a temperature or nucleus that changes the
distribution, another checkpoint, or CUDA (not measured: cuBLAS picks kernels by shape): the
sampler/scorer mismatch of :mod:`tcrlsd.offpolicy`.

json only; importing this module is cheap (tcrlsd.policy's dtype rule is imported where used).
"""

from __future__ import annotations

import json

__all__ = ["sampler_record", "reuse_blocker"]

_RECORD_KEYS = ("backend", "device", "dtype", "policy", "temperature", "top_p")


def sampler_record(*, backend: str, device: str, dtype: str, temperature: float, top_p: float, policy: str) -> str:
    """The ``rollouts.sampler`` value of the rows one generate run drew: canonical JSON of the
    backend, its engine ``device`` and ``dtype`` as configured (generate.engine; ``auto`` is
    resolved by :func:`reuse_blocker` with the rule the transformers backend loads by), the
    sampling ``temperature`` / ``top_p`` and ``policy``, the content digest of the checkpoint
    folder (:func:`tcrlsd.resume.content_digest`)."""
    rec = {"backend": backend, "device": device, "dtype": dtype, "policy": policy,
           "temperature": float(temperature), "top_p": float(top_p)}
    return json.dumps(rec, sort_keys=True, separators=(",", ":"))


def reuse_blocker(record: str | None, *, policy: str, device: str, dtype: str) -> str | None:
    """None when ``sampler_logprobs`` drawn as ``record`` says are the numbers a student forward of
    the score stage would compute (module notes); else why not, in words.

    ``policy``: the content digest of the score stage's student checkpoint; ``device`` / ``dtype``:
    the score stage's resolved device and dtype."""
    from tcrlsd.policy import resolve_dtype

    if record is None:
        return ("the rollouts do not record what sampled them (no sampler column, or null: written before it "
                "existed, or by hand)")
    try:
        rec = json.loads(record)
        rec = {k: rec[k] for k in _RECORD_KEYS}
    except (ValueError, TypeError, KeyError):
        return f"unreadable sampler record {record!r} (expected JSON with {', '.join(_RECORD_KEYS)})"
    if rec["backend"] != "transformers":
        return (f"sampled by the {rec['backend']} backend: other kernels and precision than the score stage's "
                "forward (the sampler/scorer mismatch)")
    try:
        s_dtype = resolve_dtype(str(rec["dtype"]), str(rec["device"]))
    except ValueError:
        return f"sampled with engine dtype {rec['dtype']!r} on device {rec['device']!r} (not a resolvable pair)"
    if s_dtype != "float32" or dtype != "float32":
        return f"sampled in {s_dtype}, scored in {dtype}: equal numbers need float32 on both sides"
    if rec["device"] != "cpu" or device != "cpu":
        return (f"sampled on {rec['device']}, scored on {device}: equality is measured on CPU only (on CUDA "
                "cuBLAS picks kernels by shape, so the cached decode and the full forward may round apart)")
    t, p = rec["temperature"], rec["top_p"]
    if not (t == 0 or (t == 1 and p == 1)):
        return (f"sampled at temperature {t}, top_p {p}: sampler_logprobs are of that modified distribution, "
                "not the model's log-softmax the score stage computes")
    if rec["policy"] != policy:
        return "sampled from another checkpoint than the one scored (the policy folders' content digests differ)"
    return None
