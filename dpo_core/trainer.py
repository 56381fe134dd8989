"""The training loop: set up, step, evaluate, checkpoint, report through callbacks.

`train(spec, callbacks)` is the whole public surface. State lives on a `Run` object, never at
module level, so one process can run jobs back to back (the service's worker does).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpo_core import checkpoint as ckpt
from dpo_core.batching import collate, epoch_order, micro_batches, row_length, steps_per_epoch
from dpo_core.callbacks import CallbackList, Callbacks
from dpo_core.data import read_jsonl, split_pairs
from dpo_core.errors import TrainingError
from dpo_core.logprobs import sequence_logps
from dpo_core.losses import LossInputs, get_loss, sft_nll
from dpo_core.metrics import MetricSums, MetricsFile, add_loss_metrics
from dpo_core.models import (
    enable_gradient_checkpointing,
    frozen_copy,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    pick_device,
)
from dpo_core.reference import AdapterReference, ModelReference, PrecomputedReference, release
from dpo_core.spec import TrainingSpec
from dpo_core.tokenize import tokenize


@dataclass
class TrainResult:
    output_dir: str
    final_dir: str | None  # output_dir/final, None when stopped early or evaluate-only
    global_step: int
    trained_tokens: int
    stopped: bool  # should_stop() ended the run
    metrics: dict = field(default_factory=dict)  # last logged train record
    eval_metrics: dict | None = None  # last eval record


@dataclass
class Run:
    spec: TrainingSpec
    callbacks: Callbacks
    device: torch.device
    tokenizer: object
    model: torch.nn.Module
    train_rows: list
    eval_rows: list | None
    reference: object | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object | None = None
    scaler: torch.amp.GradScaler | None = None
    progress: ckpt.Progress = field(default_factory=ckpt.Progress)
    total_steps: int = 0
    metrics_file: MetricsFile | None = None

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.spec.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


# ---------------------------------------------------------------- set-up


def _load_rows(path: str, spec: TrainingSpec, tokenizer, callbacks: Callbacks) -> list:
    data = read_jsonl(path)
    if spec.loss.unpaired:
        data = split_pairs(data)
    elif not data.paired:
        raise TrainingError(
            f"{path} holds unpaired rows (prompt/completion/label); train it with loss.type: kto, or supply pairs"
        )
    result = tokenize(data, tokenizer, max_length=spec.max_length, max_prompt_length=spec.max_prompt_length)
    if result.skipped:
        callbacks.on_warning(
            f"{path}: skipped {result.skipped} of {len(data.rows)} rows whose completion does not fit in "
            f"max_length={spec.max_length} after the prompt; raise max_length or shorten max_prompt_length"
        )
    if not result.rows:
        raise TrainingError(f"{path}: no row fits in max_length={spec.max_length}")
    return result.rows


def _total_steps(spec: TrainingSpec, num_rows: int) -> int:
    if spec.max_steps is not None:
        return spec.max_steps
    return math.ceil(spec.num_epochs * steps_per_epoch(num_rows, spec.batch_size))


def _make_optimizer(spec: TrainingSpec, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # As in most LM recipes: no weight decay on biases and norm weights (the 1-D parameters).
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=spec.learning_rate,
        betas=(spec.adam_beta1, spec.adam_beta2),
        eps=spec.adam_epsilon,
    )


def _make_scheduler(spec: TrainingSpec, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(spec.lr_scheduler, spec.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=max(total_steps, 1))


def _batches_of(rows: list, size: int, pad_id: int):
    for part in micro_batches(rows, size):
        yield collate(part, pad_id)


def _make_reference(run: Run, initial_copy) -> None:
    spec = run.spec
    if not spec.loss.needs_reference:
        return
    size = spec.eval_batch_size or spec.micro_batch
    if spec.reference_model:
        ref = ModelReference(load_causal_lm(spec.reference_model, "reference model").to(run.device), run.autocast, spec.logprob_chunk_size)
    elif spec.lora is not None:
        ref = AdapterReference(run.model, run.autocast, spec.logprob_chunk_size)
    else:
        ref = ModelReference(initial_copy, run.autocast, spec.logprob_chunk_size)
    if spec.reference_mode == "model":
        run.reference = ref
        return
    pad = run.tokenizer.pad_token_id
    splits = {"train": (_num_rows(run.train_rows), _batches_of(run.train_rows, size, pad))}
    if run.eval_rows:
        splits["eval"] = (_num_rows(run.eval_rows), _batches_of(run.eval_rows, size, pad))
    run.reference = PrecomputedReference.compute(ref, splits, run.device)
    if isinstance(ref, ModelReference):
        release(ref)  # its work is done: free the memory for the policy


def _num_rows(rows: list) -> int:
    return max(r.index for r in rows) + 1


def setup(spec: TrainingSpec, callbacks: Callbacks | None = None) -> tuple[Run, str | None]:
    callbacks = callbacks or Callbacks()
    resume_dir = ckpt.resolve_resume(spec.resume_from, spec.output_dir)
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(resume_dir or spec.model)
    train_rows = _load_rows(spec.train_file, spec, tokenizer, callbacks)
    eval_rows = _load_rows(spec.validation_file, spec, tokenizer, callbacks) if spec.validation_file else None
    device = pick_device(spec)
    model = load_policy(spec, resume_dir).to(device)
    # The default reference is the policy's initial weights: copy before the first update.
    needs_copy = spec.loss.needs_reference and not spec.reference_model and spec.lora is None
    initial = frozen_copy(load_causal_lm(spec.model).to(device) if resume_dir else model) if needs_copy else None
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    run = Run(spec, callbacks, device, tokenizer, model, train_rows, eval_rows)
    run.total_steps = _total_steps(spec, len(train_rows))
    run.metrics_file = MetricsFile(spec.output_dir)
    _make_reference(run, initial)
    run.optimizer = _make_optimizer(spec, model)
    run.scheduler = _make_scheduler(spec, run.optimizer, run.total_steps)
    run.scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16")
    if resume_dir:
        _restore(run, resume_dir)
    return run, resume_dir


def _restore(run: Run, resume_dir: str) -> None:
    progress, state = ckpt.load_progress(resume_dir)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    run.progress = progress
    run.metrics_file.truncate_after(progress.step)


# ---------------------------------------------------------------- one forward


def _loss_inputs(run: Run, batch, policy_logps, counts) -> LossInputs:
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


def _row_weights(run: Run, batch) -> torch.Tensor:
    """Group weight of each loss row: one per pair, or one per sequence for unpaired losses."""
    groups = batch.groups if run.spec.loss.unpaired else batch.groups[: batch.n_chosen]
    return torch.tensor([run.spec.loss.group(g).weight for g in groups], device=run.device)


def _chosen_weights(run: Run, batch) -> torch.Tensor:
    return torch.tensor([run.spec.loss.group(g).weight for g in batch.groups[: batch.n_chosen]], device=run.device)


def forward_loss(run: Run, batch, norm: float, sft_norm: float, sums: MetricSums) -> torch.Tensor:
    """This micro-batch's share of the step loss: weighted row losses over the whole step's weight."""
    spec = run.spec
    with run.autocast():
        policy_logps, counts = sequence_logps(run.model, batch, spec.logprob_chunk_size)
    inputs = _loss_inputs(run, batch, policy_logps, counts)
    out = get_loss(spec.loss.type)(inputs, spec.loss)
    loss = (out.losses * _row_weights(run, batch)).sum() / norm
    if spec.loss.sft_weight and batch.n_chosen:
        nll = sft_nll(inputs)
        loss = loss + spec.loss.sft_weight * (nll * _chosen_weights(run, batch)).sum() / sft_norm
        sums.add_mean("nll_loss", nll)
    add_loss_metrics(sums, out, inputs.policy_chosen, inputs.policy_rejected, batch.groups[: batch.n_chosen], not spec.loss.unpaired)
    return loss


def _norms(run: Run, batches) -> tuple[float, float]:
    total = sum(_row_weights(run, b).sum().item() for b in batches)
    chosen = sum(_chosen_weights(run, b).sum().item() for b in batches)
    # A step whose rows all weigh 0 contributes nothing; avoid dividing by zero.
    return total or 1.0, chosen or 1.0


# ---------------------------------------------------------------- step, eval


def train_step(run: Run, rows: list, sums: MetricSums) -> tuple[float, float, int]:
    """One optimizer step over `rows`: (loss, grad norm, non-padding tokens)."""
    spec, pad = run.spec, run.tokenizer.pad_token_id
    batches = [collate(part, pad).to(run.device) for part in micro_batches(rows, spec.micro_batch)]
    norm, sft_norm = _norms(run, batches)
    run.model.train()
    step_loss = 0.0
    for batch in batches:
        loss = forward_loss(run, batch, norm, sft_norm, sums)
        run.scaler.scale(loss).backward()
        step_loss += loss.item()
    run.scaler.unscale_(run.optimizer)
    params = [p for p in run.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm or float("inf"))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    # Free gradient memory now rather than at the start of the next step.
    run.optimizer.zero_grad(set_to_none=True)
    sums.add("loss", step_loss, 1)
    return step_loss, float(grad_norm), sum(b.num_tokens for b in batches)


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Metrics over every validation row, prefixed `eval_`."""
    spec, pad = run.spec, run.tokenizer.pad_token_id
    if isinstance(run.reference, PrecomputedReference):
        run.reference.use("eval")
    run.model.eval()
    batches = [collate(part, pad).to(run.device) for part in micro_batches(run.eval_rows, spec.eval_batch_size or spec.micro_batch)]
    norm, sft_norm = _norms(run, batches)
    sums = MetricSums()
    total = sum(forward_loss(run, b, norm, sft_norm, sums).item() for b in batches)
    if isinstance(run.reference, PrecomputedReference):
        run.reference.use("train")
    record = {k: v for k, v in sums.means("eval_").items()}
    record.update(eval_loss=total, step=run.progress.step, epoch=_epoch(run))
    return record


def _epoch(run: Run) -> float:
    per_epoch = steps_per_epoch(len(run.train_rows), run.spec.batch_size)
    return round(run.progress.epoch + run.progress.batch_in_epoch / per_epoch, 4)


# ---------------------------------------------------------------- the loop


@dataclass
class _Window:
    """What happened since the last log line."""

    sums: MetricSums = field(default_factory=MetricSums)
    grad_norms: list = field(default_factory=list)
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


def _log(run: Run, window: _Window) -> dict:
    seconds = max(time.perf_counter() - window.started, 1e-9)
    record = {"step": run.progress.step, "epoch": _epoch(run), "total_steps": run.total_steps}
    record.update(window.sums.means())
    record.update(
        learning_rate=run.scheduler.get_last_lr()[0],
        grad_norm=sum(window.grad_norms) / max(len(window.grad_norms), 1),
        num_tokens=run.progress.num_tokens,
        elapsed_s=round(run.progress.elapsed_s, 3),
        tokens_per_s=round(window.tokens / seconds, 2),
    )
    run.metrics_file.append(record)
    run.callbacks.on_log(record)
    return record


def _eval_and_report(run: Run) -> dict:
    record = evaluate(run)
    run.metrics_file.append(record)
    run.callbacks.on_eval(record)
    return record


def _checkpoint(run: Run) -> None:
    path = ckpt.save_checkpoint(run.spec.output_dir, run.model, run.tokenizer, run.optimizer, run.scheduler, run.progress)
    ckpt.prune(run.spec.output_dir, run.spec.save_total_limit)
    run.callbacks.on_checkpoint(run.progress.step, path)


def _after_step(run: Run, window: _Window, last: dict) -> tuple[_Window, dict]:
    spec, step = run.spec, run.progress.step
    done = step >= run.total_steps
    if step % spec.logging_steps == 0 or done:
        last["train"] = _log(run, window)
        window = _Window()
    if run.eval_rows and spec.eval_steps and step % spec.eval_steps == 0 and not done:
        last["eval"] = _eval_and_report(run)
    if spec.save_steps and step % spec.save_steps == 0:
        _checkpoint(run)
    return window, last


def _loop(run: Run) -> tuple[dict, bool]:
    """Train until total_steps or should_stop(); returns (last records, stopped)."""
    spec, progress = run.spec, run.progress
    lengths = [row_length(r) for r in run.train_rows]
    window, last = _Window(), {}
    while progress.step < run.total_steps:
        order = epoch_order(lengths, spec.batch_size, spec.seed, progress.epoch, spec.group_by_length)
        for positions in order[progress.batch_in_epoch :]:
            if run.callbacks.should_stop():
                return last, True
            started = time.perf_counter()
            _, grad_norm, tokens = train_step(run, [run.train_rows[i] for i in positions], window.sums)
            progress.step += 1
            progress.batch_in_epoch += 1
            progress.num_tokens += tokens
            progress.elapsed_s += time.perf_counter() - started
            window.grad_norms.append(grad_norm)
            window.tokens += tokens
            run.callbacks.on_step(progress.step, run.total_steps)
            window, last = _after_step(run, window, last)
            if progress.step >= run.total_steps:
                break
        else:
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    return last, False


def _save_final(run: Run) -> str:
    target = Path(run.spec.output_dir) / "final"
    if run.spec.lora is None:
        return ckpt.save_model_dir(target, run.model, run.tokenizer)

    def write(tmp: Path) -> None:
        # LoRA: the adapter in final/adapter/, and a merged model in final/ that loads without PEFT.
        run.model.save_pretrained(tmp / "adapter")
        run.tokenizer.save_pretrained(tmp / "adapter")
        run.model.merge_and_unload().save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)

    ckpt.atomic_dir(target, write)
    return str(target)


def train(spec: TrainingSpec, callbacks: Callbacks | None = None) -> TrainResult:
    """Run the training (or, with max_steps: 0, evaluation-only) job that `spec` describes."""
    callbacks = callbacks or Callbacks()
    run, resume_dir = setup(spec, callbacks)
    callbacks.on_start(
        {
            "total_steps": run.total_steps,
            "num_train_rows": len(run.train_rows),
            "num_eval_rows": len(run.eval_rows or []),
            "resumed_from_step": run.progress.step if resume_dir else None,
            "resumed_from": resume_dir,
        }
    )
    if run.eval_rows and spec.eval_on_start and run.progress.step == 0 and run.total_steps > 0:
        _eval_and_report(run)
    last, stopped = _loop(run)
    if stopped:
        return TrainResult(spec.output_dir, None, run.progress.step, run.progress.num_tokens, True, last.get("train", {}), last.get("eval"))
    if run.eval_rows:
        last["eval"] = _eval_and_report(run)
    final = _save_final(run) if run.total_steps > 0 else None
    return TrainResult(spec.output_dir, final, run.progress.step, run.progress.num_tokens, False, last.get("train", {}), last.get("eval"))
