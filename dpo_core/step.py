"""The inner step: one forward of chosen and rejected together, the loss, the update; and evaluation.

Everything here works the same with one process or many: a step's rows are dealt out to the ranks,
every rank runs the same number of micro-batches (a rank short of rows runs a zero-weight one, so
the collectives inside DDP/FSDP line up), and losses are normalised by the global row weight.
"""
from __future__ import annotations

import contextlib
import math

import torch

from dpo_core import distributed, divergence
from dpo_core.batching import Batch, collate, micro_batches
from dpo_core.losses import LossInputs, LossOutput, get_loss, is_per_pair, sft_nll
from dpo_core.metrics import MetricSums, add_loss_metrics
from dpo_core.pairhead import PairObjective
from dpo_core.reference import PrecomputedReference
from dpo_core.spec import LossSpec


def _loss_inputs(run, batch: Batch, policy_logps: torch.Tensor, ref: torch.Tensor | None) -> LossInputs:
    c, counts = batch.n_chosen, batch.targets.counts
    betas = torch.tensor([run.spec.loss.group(g).beta for g in batch.groups], device=run.device)
    return LossInputs(
        policy_chosen=policy_logps[:c],
        policy_rejected=policy_logps[c:],
        ref_chosen=None if ref is None else ref[:c],
        ref_rejected=None if ref is None else ref[c:],
        chosen_tokens=counts[:c],
        rejected_tokens=counts[c:],
        beta_chosen=betas[:c],
        beta_rejected=betas[c:],
    )


def row_weights(run, batch: Batch) -> torch.Tensor:
    """Group weight of each loss row: one per pair, or one per sequence for unpaired losses."""
    groups = batch.groups if run.spec.loss.unpaired else batch.groups[: batch.n_chosen]
    return torch.tensor([run.spec.loss.group(g).weight for g in groups], device=run.device)


def chosen_weights(run, batch: Batch) -> torch.Tensor:
    return torch.tensor([run.spec.loss.group(g).weight for g in batch.groups[: batch.n_chosen]], device=run.device)


def _weighted_loss(spec: LossSpec, inputs: LossInputs, weights, chosen_w, norms) -> tuple[torch.Tensor, LossOutput, torch.Tensor | None]:
    """(weighted loss over the step's total weight, the loss's output, the SFT NLL [Bc] or None)."""
    out = get_loss(spec.type)(inputs, spec)
    loss = (out.losses * weights).sum() / norms[0]
    nll = None
    if spec.sft_weight and inputs.chosen_tokens.numel():
        nll = sft_nll(inputs)
        loss = loss + spec.sft_weight * (nll * chosen_w).sum() / norms[1]
    return loss, out, nll


def _pair_objective(run, batch: Batch, ref, norms) -> PairObjective:
    """The loss any subset of a paired batch's pairs contributes, given their policy log-probs."""
    template = _loss_inputs(run, batch, batch.targets.counts, ref)  # its policy log-probs get replaced
    weights = row_weights(run, batch)  # one per pair: also the weight of the pair's chosen side

    def objective(pairs: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        part = template.pairs(pairs, chosen, rejected)
        return _weighted_loss(run.spec.loss, part, weights[pairs], weights[pairs], norms)[0]

    return objective


def _fuse(run, batch: Batch) -> bool:
    """Whether the loss can be formed inside the policy's LM-head pass (dpo_core.pairhead).

    Not when there is no backward to prepare (eval), not for losses with batch statistics (KTO), and
    not under fp16: its head gradients need the GradScaler's scale before the cast, known only later.
    """
    return (torch.is_grad_enabled() and batch.targets.paired and is_per_pair(run.spec.loss.type)
            and run.spec.precision != "fp16")


def forward_loss(run, batch: Batch, norms: tuple[float, float], sums: MetricSums | None) -> torch.Tensor:
    """This micro-batch's share of the step loss: its weighted row losses over the whole step's weight.

    `sums` None marks a zero-weight filler batch: it runs the forward for the collectives' sake only.
    """
    spec = run.spec
    ref = run.reference.logps(batch) if run.reference is not None else None
    objective = _pair_objective(run, batch, ref, norms) if _fuse(run, batch) else None
    with run.autocast():
        fused_loss, policy_logps = run.policy(batch.input_ids, batch.attention_mask, batch.targets, objective,
                                              position_ids=batch.position_ids, segments=batch.segments)
    inputs = _loss_inputs(run, batch, policy_logps, ref)
    # Fused: the gradient is already in fused_loss; the same loss again gives the value and metrics.
    with torch.no_grad() if fused_loss is not None else contextlib.nullcontext():
        loss, out, nll = _weighted_loss(spec.loss, inputs, row_weights(run, batch), chosen_weights(run, batch), norms)
    loss = loss if fused_loss is None else fused_loss
    if sums is None:
        return loss * 0.0
    if nll is not None:
        sums.add_mean("nll_loss", nll)
    add_loss_metrics(sums, out, inputs.policy_chosen, inputs.policy_rejected, batch.groups[: batch.n_chosen],
                     not spec.loss.unpaired)
    return loss


def _norms(run, batches: list[Batch]) -> tuple[float, float]:
    total = distributed.all_sum(sum(row_weights(run, b).sum().item() for b in batches), run.dist)
    chosen = distributed.all_sum(sum(chosen_weights(run, b).sum().item() for b in batches), run.dist)
    # A step whose rows all weigh 0 contributes nothing; avoid dividing by zero.
    return total or 1.0, chosen or 1.0


def aligned_batches(run, rows: list, size: int) -> list[Batch | None]:
    """This rank's micro-batches, padded with None up to the most any rank has."""
    batches = [_collate(run, part).to(run.device) for part in micro_batches(rows, size)]
    count = distributed.all_max(len(batches), run.dist)
    return batches + [None] * (count - len(batches))


def filler(run) -> Batch:
    """A one-row batch for a rank with nothing left to do in a step; its loss is multiplied by 0."""
    return _collate(run, run.train_rows[:1]).to(run.device)


def _collate(run, rows: list) -> Batch:
    return collate(rows, run.tokenizer.pad_token_id, run.share_prompt, run.pad_multiple, run.spec.max_length,
                   packed=run.packing)


def train_step(run, rows: list, sums: MetricSums) -> tuple[float, float, int]:
    """One optimizer step over the global batch `rows`: (loss, grad norm, non-padding tokens).
    Raises TrainingDiverged, on every rank alike, instead of applying a step that is not finite."""
    d = run.dist
    batches = aligned_batches(run, distributed.shard(rows, d), run.micro_batch)
    norms = _norms(run, [b for b in batches if b is not None])
    run.policy.train()
    local_loss = 0.0
    for i, batch in enumerate(batches):
        with distributed.no_sync(run.policy, run.spec.distributed, d, skip=i < len(batches) - 1):
            loss = forward_loss(run, batch or filler(run), norms, sums if batch is not None else None)
            # DDP and FSDP average gradients over ranks; scaling by the world size turns that into a sum.
            run.scaler.scale(loss * d.world).backward()
        local_loss += loss.item()
    grad_norm = _unscale_and_clip(run)
    # One all-reduce for the step's loss, tokens and ranks whose gradient norm is not finite, so that
    # every rank decides alike whether the step diverged (dpo_core.divergence), before it is applied.
    local_tokens = sum(b.num_tokens for b in batches if b is not None)
    step_loss, tokens, bad_norms = distributed.all_sums(
        [local_loss, float(local_tokens), float(not math.isfinite(grad_norm))], d)
    divergence.check_step(run, step_loss, grad_norm, norms_finite=bad_norms == 0)
    _apply(run)
    sums.add("loss", step_loss if d.main else 0.0, 1 if d.main else 0)
    return step_loss, grad_norm, int(tokens)


def _unscale_and_clip(run) -> float:
    """The gradients' global norm, after unscaling (fp16) and clipping them to max_grad_norm."""
    run.scaler.unscale_(run.optimizer)
    params = [p for p in run.policy.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, run.spec.max_grad_norm or float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def _apply(run) -> None:
    """The optimizer step (which the fp16 GradScaler skips when the gradients overflowed)."""
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    # Free gradient memory now rather than at the start of the next step.
    run.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(run) -> dict:
    """Metrics over every validation row, averaged over rows (not batches), prefixed `eval_`."""
    if isinstance(run.reference, PrecomputedReference):
        run.reference.use("eval")
    run.policy.eval()
    size = run.spec.eval_batch_size or run.micro_batch
    batches = aligned_batches(run, distributed.shard(run.eval_rows, run.dist), size)
    norms = _norms(run, [b for b in batches if b is not None])
    sums = MetricSums()
    local = sum(forward_loss(run, b or filler(run), norms, sums if b is not None else None).item() for b in batches)
    if isinstance(run.reference, PrecomputedReference):
        run.reference.use("train")
    sums.merge(distributed.gather_objects(sums.state(), run.dist))
    record = sums.means("eval_")
    record["eval_loss"] = distributed.all_sum(local, run.dist)
    return record
