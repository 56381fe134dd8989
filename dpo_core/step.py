"""The inner step: one forward of chosen and rejected together, the loss, the update; and evaluation.

Everything here works the same with one process or many: a step's rows are dealt out to the ranks,
every rank runs the same number of micro-batches (a rank short of rows runs a zero-weight one, so
the collectives inside DDP/FSDP line up), and losses are normalised by the global row weight.
"""
from __future__ import annotations

import torch

from dpo_core import distributed
from dpo_core.batching import Batch, collate, micro_batches
from dpo_core.losses import LossInputs, get_loss, sft_nll
from dpo_core.metrics import MetricSums, add_loss_metrics
from dpo_core.reference import PrecomputedReference


def _loss_inputs(run, batch: Batch, policy_logps, counts) -> LossInputs:
    c = batch.n_chosen
    ref = run.reference.logps(batch) if run.reference is not None else None
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


def forward_loss(run, batch: Batch, norms: tuple[float, float], sums: MetricSums | None) -> torch.Tensor:
    """This micro-batch's share of the step loss: its weighted row losses over the whole step's weight.

    `sums` None marks a zero-weight filler batch: it runs the forward for the collectives' sake only.
    """
    spec = run.spec
    with run.autocast():
        policy_logps, counts = run.policy(batch.input_ids, batch.attention_mask, batch.loss_mask)
    inputs = _loss_inputs(run, batch, policy_logps, counts)
    out = get_loss(spec.loss.type)(inputs, spec.loss)
    loss = (out.losses * row_weights(run, batch)).sum() / norms[0]
    if spec.loss.sft_weight and batch.n_chosen:
        nll = sft_nll(inputs)
        loss = loss + spec.loss.sft_weight * (nll * chosen_weights(run, batch)).sum() / norms[1]
        if sums is not None:
            sums.add_mean("nll_loss", nll)
    if sums is None:
        return loss * 0.0
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
    pad = run.tokenizer.pad_token_id
    batches = [collate(part, pad).to(run.device) for part in micro_batches(rows, size)]
    count = distributed.all_max(len(batches), run.dist)
    return batches + [None] * (count - len(batches))


def filler(run) -> Batch:
    """A one-row batch for a rank with nothing left to do in a step; its loss is multiplied by 0."""
    return collate(run.train_rows[:1], run.tokenizer.pad_token_id).to(run.device)


def train_step(run, rows: list, sums: MetricSums) -> tuple[float, float, int]:
    """One optimizer step over the global batch `rows`: (loss, grad norm, non-padding tokens)."""
    d = run.dist
    batches = aligned_batches(run, distributed.shard(rows, d), run.spec.micro_batch)
    norms = _norms(run, [b for b in batches if b is not None])
    run.policy.train()
    local_loss = 0.0
    for i, batch in enumerate(batches):
        with distributed.no_sync(run.policy, run.spec.distributed, d, skip=i < len(batches) - 1):
            loss = forward_loss(run, batch or filler(run), norms, sums if batch is not None else None)
            # DDP and FSDP average gradients over ranks; scaling by the world size turns that into a sum.
            run.scaler.scale(loss * d.world).backward()
        local_loss += loss.item()
    grad_norm = _clip_and_step(run)
    step_loss = distributed.all_sum(local_loss, d)
    sums.add("loss", step_loss if d.main else 0.0, 1 if d.main else 0)
    tokens = distributed.all_sum(sum(b.num_tokens for b in batches if b is not None), d)
    return step_loss, grad_norm, int(tokens)


def _clip_and_step(run) -> float:
    run.scaler.unscale_(run.optimizer)
    params = [p for p in run.policy.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, run.spec.max_grad_norm or float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    # Free gradient memory now rather than at the start of the next step.
    run.optimizer.zero_grad(set_to_none=True)
    return float(norm)


@torch.no_grad()
def evaluate(run) -> dict:
    """Metrics over every validation row, averaged over rows (not batches), prefixed `eval_`."""
    if isinstance(run.reference, PrecomputedReference):
        run.reference.use("eval")
    run.policy.eval()
    size = run.spec.eval_batch_size or run.spec.micro_batch
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
