"""Divergence: a run whose loss, gradient norm or weights stop being finite ends at that step.

One NaN spreads: the update it causes makes every later loss and weight NaN, so a run that went on
would end with a model of NaNs that looks finished. Instead the run raises TrainingDiverged at the
first step whose loss or gradient norm is not finite, before the optimizer applies that step, and
before it writes a checkpoint or final model whose trained weights are not finite. The checkpoints
already written are then the last finite ones.

Under fp16 the GradScaler overflows the gradients on purpose while it looks for its scale, and skips
those steps (the weights do not change): a non-finite gradient norm with the scaler on is not
divergence. A non-finite loss is, whatever the precision.

Every check decides the same on every rank: the step's loss and the gradient-norm flag are summed
over ranks in the step's one all-reduce (dpo_core.step.train_step), and the weights check is one
`any_true` per checkpoint.
"""
from __future__ import annotations

import math

import torch

from dpo_core import distributed
from dpo_core.errors import TrainingDiverged


def check_step(run, loss: float, grad_norm: float, norms_finite: bool) -> None:
    """Raise TrainingDiverged if the step being taken (not yet applied) is not finite.

    `loss` is the step's loss summed over ranks; `norms_finite` whether every rank's gradient norm is.
    """
    step = run.progress.step + 1
    if not math.isfinite(loss):
        raise diverged(run.spec, step, f"the loss is {loss}")
    if not norms_finite and not run.scaler.is_enabled():
        raise diverged(run.spec, step, f"the gradient norm is {grad_norm if not math.isfinite(grad_norm) else 'nan'}")


def check_weights(run) -> None:
    """Raise TrainingDiverged if a trained weight is not finite; a collective: call it on every rank.

    Only trainable parameters can change, so only they are looked at (under LoRA: the adapters). A
    min and max per tensor (NaN propagates through both) cost no copy of the weights, and one sync.
    """
    extremes = [torch.aminmax(_local(p).detach()) for p in run.model.parameters() if p.requires_grad]
    bad = bool(extremes) and not bool(torch.isfinite(torch.stack([v for pair in extremes for v in pair])).all())
    if distributed.any_true(bad, run.dist):
        raise diverged(run.spec, run.progress.step, "the weights after it are not finite")


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # FSDP2: this rank's shard


def diverged(spec, step: int, what: str) -> TrainingDiverged:
    """The error, with what to try, in the spec's own terms."""
    tips = [f"a lower learning_rate (now {spec.learning_rate:g})", f"a lower loss.beta (now {spec.loss.beta:g})"]
    if spec.precision == "fp16":
        tips.insert(0, "precision: bf16 instead of fp16")
    if spec.max_grad_norm is None:
        tips.append("max_grad_norm: 1.0 (gradient clipping is off)")
    else:
        tips.append(f"a lower max_grad_norm (now {spec.max_grad_norm:g})")
    return TrainingDiverged(
        f"training diverged at step {step}: {what}. The run stopped there and wrote no checkpoint or model "
        f"from that step; earlier checkpoints are intact. Try {', '.join(tips)}, or look for outlier rows in the data"
    )
