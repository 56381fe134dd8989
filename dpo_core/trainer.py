"""The training loop: set up, step, evaluate, checkpoint, report through callbacks.

`train(spec, callbacks)` is the whole public surface. State lives on a `Run` object, never at
module level, so one process can run jobs back to back (the service's worker does). Under several
processes (dpo_core.distributed) only rank 0 reports and writes files.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpo_core import checkpoint as ckpt
from dpo_core import distributed, divergence, memplan, packing, refcache, samples
from dpo_core.batching import epoch_order, padded_width, row_length
from dpo_core.callbacks import Callbacks
from dpo_core.compiling import compile_layers
from dpo_core.data import read_jsonl, rows_for_loss
from dpo_core.diagnostics import Diagnostics
from dpo_core.early_stopping import Best
from dpo_core.errors import TrainingError
from dpo_core.estimate import epoch_summary, live_model_facts, peak_rss_bytes
from dpo_core.layout import FINAL_DIR, checkpoint_dir
from dpo_core.logprobs import LogProbModel, can_share_prompt, packing_unsupported
from dpo_core.metrics import MetricSums, MetricsFile
from dpo_core.models import adapter_start, checkpoint_layers, frozen_copy, load_causal_lm, load_policy
from dpo_core.reference import AdapterReference, ModelReference, PrecomputedReference, frozen_dtype, release
from dpo_core.reporting import with_reporters
from dpo_core.spec import TrainingSpec, steps_per_epoch
from dpo_core.step import aligned_batches, evaluate, filler, train_step
from dpo_core.tokenize import TokenizeResult, hold_out_for_samples, tokenize
from dpo_core.tokenizer_loading import load_tokenizer


@dataclass
class TrainResult:
    output_dir: str
    final_dir: str | None  # output_dir/final, None when stopped early or evaluate-only
    global_step: int
    trained_tokens: int
    stopped: bool  # should_stop() ended the run
    metrics: dict = field(default_factory=dict)  # last logged train record
    eval_metrics: dict | None = None  # the final model's eval record: the last, or the best when best_step is set
    early_stopped_at_step: int | None = None  # training.early_stopping ended the run at this step
    best_step: int | None = None  # the final model holds this step's weights (early stopping, load_best_at_end)
    # What the run measured (dpo_core.estimate.measured turns these into a job's `measured`):
    train_seconds: float = 0.0  # in optimizer steps, over every run of a resumed job (progress.elapsed_s)
    parameters: int = 0  # the policy's, LoRA base included
    trainable_parameters: int = 0
    device: str = "cpu"  # cpu | cuda
    peak_memory_bytes: int = 0  # cpu: this process's peak RSS; cuda: torch.cuda.max_memory_allocated
    memory_kind: str = "rss"  # rss | cuda_allocated
    epoch: dict = field(default_factory=dict)  # one epoch of training rows (dpo_core.estimate.epoch_summary)
    memory_plan: dict = field(default_factory=dict)  # the micro batch and layers checkpointed (MemoryPlan.info)


@dataclass
class Run:
    spec: TrainingSpec
    callbacks: Callbacks
    dist: distributed.Dist
    device: torch.device
    tokenizer: object
    model: torch.nn.Module  # the transformers (or PEFT) model: what gets saved
    policy: torch.nn.Module  # LogProbModel around `model`, wrapped in DDP/FSDP when distributed
    train_rows: list
    eval_rows: list | None
    reference: object | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object | None = None
    scaler: torch.amp.GradScaler | None = None
    share_prompt: bool = False  # pairs packed one row each (batching._collate_shared)
    packing: bool = False  # a micro batch's sequences in one row (batching._collate_packed)
    pad_multiple: int = 1  # batch widths round up to a multiple of this (batching.padded_width)
    progress: ckpt.Progress = field(default_factory=ckpt.Progress)
    total_steps: int = 0
    metrics_file: MetricsFile | None = None
    row_counts: dict = field(default_factory=dict)  # rows dropped and truncated per file (_row_counts)
    diagnostics: Diagnostics | None = None
    best: Best | None = None  # the best evaluation so far, by spec.best_metric
    early_stopped_at: int | None = None
    sampler: samples.Sampler | None = None  # spec.samples, on rank 0
    sample_prompts: list = field(default_factory=list)  # prompts held out of training for samples
    reference_cache: str | None = None  # hit | stored: the reference log-probs came from, or went to, spec.reference_cache
    plan: memplan.MemoryPlan | None = None  # the micro batch and checkpointed layers that fit max_memory

    @property
    def micro_batch(self) -> int:
        """Rows per forward pass: the memory plan's (dpo_core.memplan), which keeps a micro_batch_size given."""
        return self.plan.micro_batch if self.plan is not None else self.spec.micro_batch

    @property
    def final_is_best(self) -> bool:
        """Whether the final model is the best evaluation's weights rather than the last step's."""
        return self.spec.load_best_at_end or self.spec.early_stopping is not None

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.spec.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


# ---------------------------------------------------------------- set-up


def _load_rows(path: str, spec: TrainingSpec, tokenizer, callbacks: Callbacks) -> TokenizeResult:
    data = read_jsonl(path)
    # Messages name the file, not its path: under the service the path is the server's, and a team reads
    # these as job events and errors.
    for warning in data.warnings:
        callbacks.on_warning(f"{data.source}: {warning.message}")
    data = rows_for_loss(data, spec.loss.unpaired)
    result = tokenize(data, tokenizer, max_length=spec.max_length, max_prompt_length=spec.max_prompt_length)
    if result.skipped:
        callbacks.on_warning(
            f"{data.source}: skipped {result.skipped} of {len(data.rows)} rows whose completion does not fit in "
            f"max_length={spec.max_length} after the prompt; raise max_length or shorten max_prompt_length"
        )
    if not result.rows:
        raise TrainingError(f"{data.source}: no row fits in max_length={spec.max_length}")
    return result


def _row_counts(train: TokenizeResult, evals: TokenizeResult | None) -> dict[str, int]:
    """Rows tokenization dropped (no completion token fits) and truncated, per file, for on_start."""
    counts = {"train_rows_dropped": train.skipped, "train_rows_truncated": train.truncated}
    counts.update(eval_rows_dropped=evals.skipped if evals else 0, eval_rows_truncated=evals.truncated if evals else 0)
    return counts


def _make_optimizer(spec: TrainingSpec, module) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
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
        # One fused kernel instead of a dozen passes over every parameter. FSDP2's
        # sharded (DTensor) parameters take the default implementation.
        fused=spec.distributed != "fsdp",
    )


def _make_scheduler(spec: TrainingSpec, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(spec.lr_scheduler, spec.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=max(total_steps, 1))


def _live_reference(run: Run, initial_copy):
    spec = run.spec
    # Under FSDP the frozen reference is sharded too; under DDP each rank keeps a full copy.
    wrap = distributed.shard_fsdp if run.dist.enabled and spec.distributed == "fsdp" else None
    if spec.reference_model:
        model = load_causal_lm(spec.reference_model, "reference model", frozen_dtype(spec)).to(run.device)
        if run.share_prompt and not can_share_prompt(model):
            if spec.share_prompt is True:
                raise TrainingError("share_prompt: the reference model does not take the shared-prompt layout "
                                    "(it needs SDPA attention and a separate LM head); set share_prompt: false")
            run.share_prompt = False  # auto: no batch is built yet, so both models get two rows per pair
        run.packing = run.packing and _packs(spec, model, "the reference model ")
        return ModelReference(_compiled(spec, model), run.autocast, spec.logprob_chunk_size, wrap)
    if spec.lora is not None and spec.adapter is None:
        return AdapterReference(run.model, run.autocast, spec.logprob_chunk_size)
    if run.packing:  # the policy's architecture: it packs as the policy does
        packing.enable(initial_copy)
    return ModelReference(_compiled(spec, initial_copy), run.autocast, spec.logprob_chunk_size, wrap)


def _make_reference(run: Run, initial_copy, cache: refcache.Entry | None = None) -> None:
    spec = run.spec
    if not spec.loss.needs_reference:
        return
    if cache is not None and cache.hit:
        run.reference, run.reference_cache = PrecomputedReference(cache.tables), "hit"
        return
    ref = _live_reference(run, initial_copy)
    if spec.reference_mode == "model":
        run.reference = ref
        return
    size = spec.eval_batch_size or run.micro_batch
    splits = {"train": (_num_rows(run.train_rows), aligned_batches(run, distributed.shard(run.train_rows, run.dist), size))}
    if run.eval_rows:
        splits["eval"] = (_num_rows(run.eval_rows), aligned_batches(run, distributed.shard(run.eval_rows, run.dist), size))
    run.reference = PrecomputedReference.compute(ref, splits, filler(run), run.dist)
    if isinstance(ref, ModelReference):
        release(ref)  # its work is done: free the memory for the policy
    if cache is not None and run.dist.main and refcache.save(cache, run.reference.tables, run.callbacks):
        run.reference_cache = "stored"


def _num_rows(rows: list) -> int:
    return max(r.index for r in rows) + 1


def _share_prompt(spec: TrainingSpec, model) -> bool:
    """Whether batches put a pair in one row (batching._collate_shared); a separate reference model is
    checked when it is loaded."""
    if spec.share_prompt is False or spec.loss.unpaired:
        return False
    able = can_share_prompt(model)
    if spec.share_prompt is True and not able:
        raise TrainingError("share_prompt: true needs a model with SDPA attention and a separate LM head; "
                            "set share_prompt: false (or auto)")
    return able


def _packing(spec: TrainingSpec, model, device: torch.device) -> bool:
    """Whether batches are packed rows (batching._collate_packed). Auto: on a GPU in bf16/fp16, where a
    variable-length attention kernel saves the padding's FLOPs; on a CPU the padded rows stay (their
    attention is one batched call, the packed row's one call a sequence). A separate reference model is
    checked when it is loaded."""
    if spec.packing is False:
        return False
    if spec.packing == "auto" and (device.type != "cuda" or spec.precision == "fp32" or spec.share_prompt is True):
        return False
    return _packs(spec, model, "")


def _packs(spec: TrainingSpec, model, which: str) -> bool:
    """Whether `model` takes packed rows (and, if so, set it up for them); packing: true raises if not."""
    why = packing_unsupported(model)
    if why is not None and spec.packing is True:
        raise TrainingError(f"packing: {which}{why}; set packing: false (or auto)")
    if why is None:
        packing.enable(model)
    return why is None


def _pad_multiple(spec: TrainingSpec, device: torch.device) -> int:
    """Auto: 64 on a GPU, where attention kernels are planned per input shape and length-grouped
    batches would give nearly every step a new width; 1 on a CPU, where padding is only extra work."""
    if spec.pad_to_multiple_of is not None:
        return spec.pad_to_multiple_of
    return 64 if device.type == "cuda" else 1


def _load_models(spec: TrainingSpec, device, resume_dir, reference: bool = True):
    """(the policy's model, a frozen initial copy or None); `reference` False: no reference model is needed
    (its log-probs come from the cache)."""
    model = load_policy(spec, resume_dir).to(device)
    # The default reference is the policy's initial weights: copy before the first update.
    # A LoRA run's is the base with its adapters disabled, unless it trains a given adapter further.
    needs_copy = (reference and spec.loss.needs_reference and not spec.reference_model
                  and (spec.lora is None or spec.adapter))
    initial, dtype = None, frozen_dtype(spec)
    if needs_copy and spec.adapter:
        initial = adapter_start(spec, dtype).to(device)
    elif needs_copy:
        initial = frozen_copy(load_causal_lm(spec.model).to(device) if resume_dir else model, dtype)
    return model, initial


def _workload(spec: TrainingSpec, rows: list, shared: bool, pad_multiple: int) -> memplan.Workload:
    """Padded tokens a row puts in a micro batch, at the longest train or eval row: one row of prompt, chosen
    and rejected when the prompt is shared, else a sequence per completion (two a pair) of prompt + the
    longer completion (batching.collate pads both to one width)."""
    if shared:
        longest = max(len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in rows)
        width = padded_width(longest, pad_multiple)
        return memplan.Workload(width, _completion_share(rows), width)
    per_row = 1 if spec.loss.unpaired else 2
    width = padded_width(max(row_length(r) for r in rows), pad_multiple, spec.max_length)
    return memplan.Workload(per_row * width, _completion_share(rows), width)


def _completion_share(rows: list) -> float:
    summary = epoch_summary(rows)
    return summary["completion_tokens"] / max(summary["tokens"], 1)


def _plan_memory(run: Run, rows: list) -> memplan.MemoryPlan:
    """The micro batch and checkpointed layers that fit the budget (dpo_core.memplan), for the layout the run
    batches with. A separate reference model may still turn an auto share_prompt off (_live_reference): then
    the plan is made for two rows a pair, the larger layout."""
    spec = run.spec
    shared = run.share_prompt and (spec.share_prompt is True or not spec.reference_model)
    workload = _workload(spec, rows, shared, run.pad_multiple)
    budget = memplan.device_budget(spec, run.device)
    if run.device.type == "cpu" and spec.max_memory is not None:
        memplan.return_freed_memory()  # else freed activations can stay resident past the budget
    return memplan.plan(spec, live_model_facts(run.model), run.device.type, budget, workload, run.dist.world)


def _compiled(spec: TrainingSpec, model):
    """`model` with its decoder layers compiled in place when spec.compile (dpo_core.compiling)."""
    if spec.compile:
        compile_layers(model)
    return model


def setup(spec: TrainingSpec, callbacks: Callbacks | None = None) -> tuple[Run, str | None]:
    callbacks = callbacks or Callbacks()
    d = distributed.init(spec.device)
    resume_dir = ckpt.resolve_resume(spec.resume_from, spec.output_dir)
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(resume_dir or spec.tokenizer_source)
    train = _load_rows(spec.train_file, spec, tokenizer, callbacks)
    evals = _load_rows(spec.validation_file, spec, tokenizer, callbacks) if spec.validation_file else None
    device = distributed.device(d, spec.device)
    rows = {"train": _num_rows(train.rows), **({"eval": _num_rows(evals.rows)} if evals else {})}
    cache = refcache.lookup(spec, rows, callbacks, d)
    model, initial = _load_models(spec, device, resume_dir, reference=not (cache and cache.hit))
    train_rows, held_out = hold_out_for_samples(spec, train.rows)
    if not train_rows:
        raise TrainingError(f"every training row has one of the {len(held_out)} prompts held out for samples; "
                            "give a validation_file for samples' prompts, or lower samples.num_prompts")
    run = Run(spec, callbacks, d, device, tokenizer, model, None, train_rows, evals.rows if evals else None)
    run.sample_prompts = held_out
    run.row_counts = _row_counts(train, evals)
    run.packing = _packing(spec, model, device)
    run.share_prompt = not run.packing and _share_prompt(spec, model)
    run.pad_multiple = _pad_multiple(spec, device)
    run.plan = _plan_memory(run, train.rows + (evals.rows if evals else []))
    checkpoint_layers(model, run.plan.checkpointed_layers)
    _compiled(spec, model)  # after frozen_copy (_load_models): a deep copy of a compiled layer would run these weights
    run.policy = distributed.wrap(LogProbModel(model, spec.logprob_chunk_size), spec.distributed, d, device)
    run.total_steps = spec.total_steps(len(train_rows))
    run.metrics_file = MetricsFile(spec.output_dir)
    run.diagnostics, run.best = Diagnostics(spec, run.total_steps), Best.of(spec)
    _make_reference(run, initial, cache)
    run.optimizer = _make_optimizer(spec, run.policy)
    run.scheduler = _make_scheduler(spec, run.optimizer, run.total_steps)
    run.scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16")
    if resume_dir:
        _restore(run, resume_dir)
    return run, resume_dir


def _restore(run: Run, resume_dir: str) -> None:
    progress, state = ckpt.load_progress(resume_dir)
    distributed.load_optimizer_state(run.policy, run.optimizer, state["optimizer"], run.dist)
    run.scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    run.progress = progress
    if run.dist.main:
        run.metrics_file.truncate_after(progress.step)
    distributed.barrier(run.dist)
    # What the run saw before its checkpoint: the best so far, and the diagnostics that already fired.
    records = run.metrics_file.records()
    run.diagnostics.replay(records)
    for record in records:
        if "eval_loss" in record:
            run.best.observe(record)


# ---------------------------------------------------------------- the loop


@dataclass
class _Window:
    """What happened since the last log line."""

    sums: MetricSums = field(default_factory=MetricSums)
    grad_norms: list = field(default_factory=list)
    tokens: int = 0
    steps: int = 0
    step_seconds: float = 0.0  # in the optimizer steps themselves, not in evaluations or checkpoints between
    started: float = field(default_factory=time.perf_counter)


def _epoch(run: Run) -> float:
    per_epoch = steps_per_epoch(len(run.train_rows), run.spec.batch_size)
    return round(run.progress.epoch + run.progress.batch_in_epoch / per_epoch, 4)


def _log(run: Run, window: _Window) -> dict:
    window.sums.merge(distributed.gather_objects(window.sums.state(), run.dist))
    seconds = max(time.perf_counter() - window.started, 1e-9)
    record = {"step": run.progress.step, "epoch": _epoch(run), "total_steps": run.total_steps}
    record.update(window.sums.means())
    record.update(
        learning_rate=run.scheduler.get_last_lr()[0],
        grad_norm=sum(window.grad_norms) / max(len(window.grad_norms), 1),
        num_tokens=run.progress.num_tokens,
        elapsed_s=round(run.progress.elapsed_s, 3),
        tokens_per_s=round(window.tokens / seconds, 2),
        step_time_s=round(window.step_seconds / max(window.steps, 1), 6),
    )
    if run.dist.main:
        run.metrics_file.append(record)
        run.callbacks.on_log(record)
        _warn(run, run.diagnostics.on_train(record))
    return record


def _eval_and_report(run: Run) -> tuple[dict, bool]:
    """Evaluate and report; (the record, whether it is the best evaluation so far). Every rank gets the
    same record, so every rank takes the same decisions from it."""
    record = evaluate(run)
    record.update(step=run.progress.step, epoch=_epoch(run))
    improved = run.best.observe(record)
    if run.dist.main:
        run.metrics_file.append(record)
        run.callbacks.on_eval(record)
        _warn(run, run.diagnostics.on_eval(record))
    return record, improved


def _warn(run: Run, found: list) -> None:
    for d in found:
        run.callbacks.on_warning(d.message, code=d.code, data={"step": d.step, **d.data})


def _model_state(run: Run) -> dict | None:
    """The full state dict to save under FSDP (a collective, run on every rank); None otherwise."""
    state = distributed.full_model_state(run.policy, run.spec.distributed, run.dist)
    if state is None:
        return None
    prefix = "model."  # the LogProbModel around the transformers model
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _checkpoint(run: Run) -> None:
    divergence.check_weights(run)
    model_state = _model_state(run)
    optimizer_state = distributed.optimizer_state(run.policy, run.optimizer)
    if run.dist.main:
        path = ckpt.save_checkpoint(run.spec.output_dir, run.model, run.tokenizer, optimizer_state, run.scheduler,
                                    run.progress, model_state)
        _prune(run)
        run.callbacks.on_checkpoint(run.progress.step, path)
    distributed.barrier(run.dist)


def _prune(run: Run) -> None:
    """save_total_limit: keep the latest checkpoints, and also the best evaluated one (by
    spec.best_metric), and the best evaluation's, which the final model may be made of."""
    if not run.spec.save_total_limit:
        return
    steps = [step for step, _ in ckpt.list_checkpoints(run.spec.output_dir)]
    metric, mode = run.spec.best_metric
    keep = {ckpt.best_by_eval(steps, run.metrics_file.eval_values(metric), mode), run.best.step} - {None}
    ckpt.prune(run.spec.output_dir, run.spec.save_total_limit, also=keep)


def _after_step(run: Run, window: _Window, last: dict) -> tuple[_Window, dict]:
    spec, step = run.spec, run.progress.step
    done = step >= run.total_steps
    if step % spec.logging_steps == 0 or done:
        last["train"] = _log(run, window)
        window = _Window()
    improved = False
    if run.eval_rows and spec.eval_steps and step % spec.eval_steps == 0 and not done:
        last["eval"], improved = _eval_and_report(run)
    # The best evaluation's weights are kept as a checkpoint when the final model is to be made of them.
    if (spec.save_steps and step % spec.save_steps == 0) or (improved and run.final_is_best):
        _checkpoint(run)
    if run.sampler is not None and samples.is_due(spec, step, done):
        samples.take(run, run.sampler, last=done)
    return window, last


def _one_step(run: Run, rows: list, window: _Window) -> None:
    progress = run.progress
    started = time.perf_counter()
    _, grad_norm, tokens = train_step(run, rows, window.sums)
    progress.step += 1
    progress.batch_in_epoch += 1
    progress.num_tokens += tokens
    seconds = time.perf_counter() - started
    progress.elapsed_s += seconds
    window.grad_norms.append(grad_norm)
    window.tokens += tokens
    window.steps += 1
    window.step_seconds += seconds
    if run.dist.main:
        run.callbacks.on_step(progress.step, run.total_steps)


def _stop(run: Run) -> None:
    """Leave a checkpoint at this step boundary if asked (preemption), unless one is already there."""
    wanted = distributed.any_true(run.callbacks.checkpoint_on_stop(), run.dist)
    already = run.spec.save_steps and run.progress.step % run.spec.save_steps == 0
    if wanted and run.progress.step > 0 and not already:
        _checkpoint(run)


def _loop(run: Run) -> tuple[dict, bool]:
    """Train until total_steps or should_stop(); returns (last records, stopped)."""
    spec, progress = run.spec, run.progress
    lengths = [row_length(r) for r in run.train_rows]
    window, last = _Window(), {}
    while progress.step < run.total_steps:
        order = epoch_order(lengths, spec.batch_size, spec.seed, progress.epoch, spec.group_by_length)
        for positions in order[progress.batch_in_epoch :]:
            # Rank 0 holds the callbacks; every rank must stop at the same step.
            if distributed.any_true(run.callbacks.should_stop(), run.dist):
                _stop(run)
                return last, True
            _one_step(run, [run.train_rows[i] for i in positions], window)
            window, last = _after_step(run, window, last)
            if run.best.should_stop:
                run.early_stopped_at = progress.step
                return last, False
            if progress.step >= run.total_steps:
                break
        else:
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    return last, False


def _save_final(run: Run) -> str:
    target = Path(run.spec.output_dir) / FINAL_DIR
    if run.final_is_best and run.best.step not in (None, run.progress.step):
        return _save_best_final(run, target)
    divergence.check_weights(run)
    model_state = _model_state(run)
    if not run.dist.main:
        distributed.barrier(run.dist)
        return str(target)
    if run.spec.lora is None:
        ckpt.save_model_dir(target, run.model, run.tokenizer, model_state)
    else:
        _write_lora_final(run, target)
    distributed.barrier(run.dist)
    return str(target)


def _write_lora_final(run: Run, target: Path) -> None:
    def write(tmp: Path) -> None:
        # LoRA: the adapter in final/adapter/, and a merged model in final/ that loads without PEFT.
        run.model.save_pretrained(tmp / "adapter")
        run.tokenizer.save_pretrained(tmp / "adapter")
        run.model.merge_and_unload().save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)

    ckpt.atomic_dir(target, write)


def _save_best_final(run: Run, target: Path) -> str:
    """The final model made of the best evaluation's checkpoint (written when that evaluation was made)."""
    source = checkpoint_dir(run.spec.output_dir, run.best.step)
    if run.dist.main:
        if run.spec.lora is None:
            ckpt.copy_model_dir(source, target)
        else:
            _load_adapter(run.model, source)
            _write_lora_final(run, target)
    distributed.barrier(run.dist)
    return str(target)


def _load_adapter(model, checkpoint: Path) -> None:
    """A LoRA checkpoint's adapter weights into the live adapter (fsdp, whose weights are sharded, takes no LoRA)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors", device="cpu"))


def _result(run: Run, last: dict, stopped: bool, final: str | None) -> TrainResult:
    p = run.progress
    best = (run.best.step or p.step) if final and run.final_is_best else None
    evaluated = run.best.record if best is not None and run.best.record else last.get("eval")
    params = list(run.model.parameters())
    cuda = run.device.type == "cuda"
    return TrainResult(
        run.spec.output_dir, final, p.step, p.num_tokens, stopped, last.get("train", {}), evaluated,
        early_stopped_at_step=run.early_stopped_at, best_step=best,
        train_seconds=p.elapsed_s, parameters=sum(t.numel() for t in params),
        trainable_parameters=sum(t.numel() for t in params if t.requires_grad), device=run.device.type,
        peak_memory_bytes=torch.cuda.max_memory_allocated(run.device) if cuda else peak_rss_bytes(),
        memory_kind="cuda_allocated" if cuda else "rss", epoch=epoch_summary(run.train_rows),
        memory_plan=run.plan.info() if run.plan is not None else {},
    )


def train(spec: TrainingSpec, callbacks: Callbacks | None = None) -> TrainResult:
    """Run the training (or, with max_steps: 0, evaluation-only) job that `spec` describes."""
    callbacks = with_reporters(spec, callbacks or Callbacks())  # spec.report_to; a missing package fails here
    run, resume_dir = setup(spec, callbacks)
    if not run.dist.main:
        run.callbacks = Callbacks()  # only rank 0 reports
    try:
        result = _train(run, resume_dir)
    except Exception as err:
        run.callbacks.on_error(err)
        raise
    run.callbacks.on_end(result)
    return result


def _plan_info(run: Run) -> dict:
    """on_start's account of the memory plan, flat (a worker's job event keeps plain values)."""
    p = run.plan
    return {"micro_batch_size": p.micro_batch, "checkpointed_layers": p.checkpointed_layers, "layers": p.layers,
            "predicted_memory_bytes": p.predicted_bytes, "memory_budget_bytes": p.budget_bytes}


def _warn_plan(run: Run) -> None:
    """A memory_plan warning when the plan asks more of the run than its spec did: a smaller micro batch than
    asked (the whole batch by default), or layers checkpointed (recomputed in backward) under auto."""
    spec, p = run.spec, run.plan
    asked = min(spec.micro_batch, memplan.rows_per_process(spec, run.dist.world))
    if p.micro_batch < asked or (spec.gradient_checkpointing == "auto" and p.checkpointed_layers):
        run.callbacks.on_warning(f"{p.message()}; asked for micro batch {asked}, gradient_checkpointing "
                                 f"{str(spec.gradient_checkpointing).lower()}", code="memory_plan", data=p.info())


def _train(run: Run, resume_dir: str | None) -> TrainResult:
    spec = run.spec
    run.callbacks.on_start(
        {
            "total_steps": run.total_steps,
            "num_train_rows": len(run.train_rows),
            "num_eval_rows": len(run.eval_rows or []),
            **run.row_counts,
            "resumed_from_step": run.progress.step if resume_dir else None,
            "resumed_from": resume_dir,
            "world_size": run.dist.world,
            "reference_cache": run.reference_cache,
            **_plan_info(run),
        }
    )
    _warn_plan(run)
    if spec.samples is not None and run.dist.main:
        run.sampler = samples.start(run, resumed=resume_dir is not None)
    if run.eval_rows and spec.eval_on_start and run.progress.step == 0 and run.total_steps > 0:
        _eval_and_report(run)
    last, stopped = _loop(run)
    if stopped:
        return _result(run, last, True, None)
    if run.eval_rows and run.early_stopped_at is None:  # an early stop has just evaluated this step
        last["eval"], _ = _eval_and_report(run)
    final = _save_final(run) if run.total_steps > 0 else None
    return _result(run, last, False, final)
