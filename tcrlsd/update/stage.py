"""The update stage end to end: inputs -> engine (+ saved state) -> train -> policy, state, teacher.

:func:`open_trainer` loads the policy into a DeepSpeed engine and, per :func:`resolve_state`, the
previous iteration's optimizer state; :func:`run_update` trains one iteration and writes

- ``policy_out``: the new policy, a plain Hugging Face folder (safetensors + tokenizer) with the
  weights' sha256 in ``weights.sha256`` (:data:`tcrlsd.policy.WEIGHTS_DIGEST`: where checkpoint
  retention keeps the weights out of DVC, this file is what DVC hashes of them). For score.teacher
  lagged or ema, the next iteration's teacher goes inside it, in ``teacher/``
  (:mod:`tcrlsd.update.teacher`, :mod:`tcrlsd.teachers`), where the next score stage finds it;
- ``state_out``: the training state for the next iteration (:mod:`tcrlsd.update.state`). It is not a
  DVC output: resume state, kept on disk by the loop's retention rule (tcrlsd/loop/retention.py).

At load, the lm-head path (:mod:`tcrlsd.lm_head`, the score stage's) is checked against
``model(ids).logits`` on the first rollout, for the policy and for the KL reference.

Both are written to temporary names and renamed when complete. Every process runs this code; rank 0
writes the files that are not per-process.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from tcrlsd.artifacts import write_text
from tcrlsd.policy import WEIGHTS_DIGEST
from tcrlsd.teachers import TEACHER_DIR, kept_teacher
from tcrlsd.tracking import Tracker
from tcrlsd.update.batching import UpdateInputs
from tcrlsd.update.params import TEACHER_MODES, UpdateError, UpdateParams
from tcrlsd.update.engine import barrier, build_engine, init_distributed, save_hf_checkpoint
from tcrlsd.update.state import (TAG, ZERO_DIR, TrainerState, replace_dir, resolve_state, weights_digest,
                                 write_state_json)
from tcrlsd.update.teacher import write_teacher
from tcrlsd.update.trainer import Trainer

__all__ = ["resolve_device", "open_trainer", "save_outputs", "run_update"]


def resolve_device(params: UpdateParams) -> tuple[str, bool]:
    """(device, bf16): auto = cuda (bf16) if available, else cpu (fp32)."""
    import torch

    device = params.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UpdateError(f"params update.device is {params.device!r} but no CUDA device is available")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    from tcrlsd.policy import resolve_dtype

    return device, resolve_dtype(params.dtype, device) == "bfloat16"  # the one dtype rule


def open_trainer(policy: str | os.PathLike, params: UpdateParams, *, iteration: int,
                 state_in: str | os.PathLike | None = None, reference: str | os.PathLike | None = None,
                 check_ids: Sequence[int] | None = None):
    """(trainer, tokenizer, why): the engine on ``policy``, with the saved state loaded when it applies.

    ``check_ids`` (one short real sequence): the lm-head check of the policy and the reference.
    """
    import torch

    from tcrlsd.lm_head import FrozenHead, check_head_path
    from tcrlsd.policy import load_policy, load_tokenizer

    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    device, bf16 = resolve_device(params)
    rank, world = init_distributed("cpu" if device == "cpu" else "cuda")
    if params.kl_coef > 0 and reference is None:
        raise UpdateError("params update.kl_coef > 0 needs --reference-policy (the KL's reference checkpoint)")
    state, why = resolve_state(state_in, iteration, policy, restart=params.restart, world_size=world,
                               zero_stage=params.zero_stage)
    torch.manual_seed(params.seed)
    model, _ = load_policy(policy, device="cpu", dtype="float32", trust_remote_code=params.trust_remote_code)
    model.config.use_cache = False
    if check_ids:
        check_head_path(model, check_ids)
    tokenizer = load_tokenizer(policy, params.trust_remote_code)
    engine = build_engine(model, params, device, bf16)
    if state is not None:
        path, _ = engine.load_checkpoint(str(Path(state_in) / ZERO_DIR), tag=TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise UpdateError(f"{state_in}/{ZERO_DIR}: DeepSpeed found no checkpoint (tag {TAG!r}) to load")
    else:
        state = TrainerState(world_size=world, zero_stage=params.zero_stage)
    ref_head = None
    if reference is not None and params.kl_coef > 0:
        ref_model, _ = load_policy(reference, device=device, dtype="bfloat16" if bf16 else "float32",
                                   trust_remote_code=params.trust_remote_code)
        if check_ids:
            check_head_path(ref_model, check_ids)
        if params.pack_tokens:  # the reference reads the same packed micro-batches
            from tcrlsd.update.packed_attention import enable_packed_attention

            enable_packed_attention(ref_model, share_prompts=params.share_prompts)
        ref_head = FrozenHead(ref_model)
    trainer = Trainer(engine, params, state, device=device, reference=ref_head)
    return trainer, tokenizer, why


def save_outputs(trainer: Trainer, tokenizer, policy_out: str | os.PathLike, state_out: str | os.PathLike, *,
                 teacher_mode: str, teacher_previous: Path | None) -> dict:
    """Write the policy (the next teacher inside) and the state folder; returns what was done."""
    import torch.distributed as dist

    rank = dist.get_rank()
    policy_out, state_out = Path(policy_out), Path(state_out)
    save_hf_checkpoint(trainer.engine, tokenizer, policy_out, trainer.params.zero_stage)
    tmp = state_out.with_name(f".{state_out.name}.partial")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    trainer.engine.save_checkpoint(str(tmp / ZERO_DIR), tag=TAG, save_latest=False)
    barrier()
    done = None
    if rank == 0:
        trainer.state = replace(trainer.state, policy_sha256=weights_digest(policy_out))
        write_text(trainer.state.policy_sha256 + "\n", policy_out / WEIGHTS_DIGEST)  # what DVC tracks of the weights
        write_state_json(trainer.state, tmp)
        # the weights digest above covers the top-level *.safetensors only: the teacher may follow
        done = write_teacher(teacher_mode, trainer.state.iteration + 1, policy_out, teacher_previous,
                             policy_out / TEACHER_DIR, refresh_every=trainer.params.teacher_refresh_every,
                             tau=trainer.params.teacher_ema_tau)
        replace_dir(tmp, state_out)
    barrier()
    return {"teacher_update": done}


def run_update(rollouts, scores, advantages, policy, policy_out, state_out, params: UpdateParams, *,
               state_in=None, teacher_mode: str = "current", reference=None, tracking=None) -> dict:
    """Train one iteration and write its outputs; returns the metrics (identical on every process).

    ``tracking`` (:class:`tcrlsd.tracking.TrackingParams` or None): rank 0 logs every step live."""
    if teacher_mode not in TEACHER_MODES:
        raise UpdateError(f"score.teacher {teacher_mode!r} is not one of {', '.join(TEACHER_MODES)}")
    inputs = UpdateInputs(rollouts, scores, advantages, sampler_logprobs=params.rollout_is != "none")
    first = inputs.read([0])[0] if len(inputs) else None
    trainer, tokenizer, why = open_trainer(policy, params, iteration=inputs.iteration, state_in=state_in,
                                           reference=reference,
                                           check_ids=(first.prompt_ids + first.response_ids)[:64] if first else None)
    # the teacher that scored this iteration (the score stage reads the same one)
    teacher_prev = kept_teacher(policy) if teacher_mode != "current" else None
    with Tracker(tracking if trainer.rank == 0 else None) as tracker:
        if tracker.enabled:
            trainer.on_step = tracker.log_step
        metrics = trainer.train_iteration(inputs)
    metrics.update(save_outputs(trainer, tokenizer, policy_out, state_out, teacher_mode=teacher_mode,
                                teacher_previous=teacher_prev))
    metrics.update({"iteration": inputs.iteration, "rollouts": len(inputs), "state": why,
                    "world_size": trainer.world, "zero_stage": params.zero_stage, "device": trainer.device,
                    "params": asdict(params)})
    return metrics
