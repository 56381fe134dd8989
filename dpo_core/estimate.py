"""What a run will cost before it runs: model facts, steps and FLOPs, peak memory, and seconds.

Torch-free (the API imports it): the model's shape comes from its config.json and the headers of its
safetensors files, the data's from a pre-flight data report (dpo_core.preflight.data_report's
FileReport) or, after a run, from the rows it trained on (`epoch_summary`).

Time is calibrated by what runs measured (`measured`: the dict a worker stores in jobs.measured): the
FLOPs per second that jobs of the same device, GPU type and precision reached on the model size nearest
this one, applied to this run's FLOPs. With no such job, a FLOPs model: MFU_GPU of the GPU's stated
peak, or CPU_FLOPS_PER_S on a CPU. docs/training.md (Estimates) says the same for users.
"""
from __future__ import annotations

import json
import math
import re
import resource
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dpo_core.spec import TrainingSpec, steps_per_epoch

GIB = 1 << 30
MIB = 1 << 20
FP32 = 4
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32, per trained weight
MFU_GPU = 0.40  # the share of a GPU's peak an uncalibrated estimate assumes
CPU_FLOPS_PER_S = 100e9  # an uncalibrated CPU worker: about a 2-core AVX-512 machine in fp32
# Dense peak FLOP/s per GPU type (worker.membership.gpu_type_of names): (bf16/fp16 tensor cores, fp32).
GPU_PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "h200": (989.4e12, 66.9e12), "h100": (989.4e12, 66.9e12), "a100": (312e12, 19.5e12),
    "l40s": (362e12, 91.6e12), "l4": (121e12, 30.3e12), "a10g": (70e12, 35e12), "a10": (125e12, 31.2e12),
    "t4": (65e12, 8.1e12), "v100": (125e12, 15.7e12), "rtx4090": (165e12, 82.6e12), "mi300x": (1307e12, 163.4e12),
}
UNKNOWN_GPU_PEAK = (100e12, 20e12)  # a GPU type not in the table
# Memory besides the terms the model gives. CPU: a training process's resident memory before the model
# (Python, torch, transformers, the tokenizer; measured ~360 MiB). CUDA: the context, cuBLAS workspaces and
# the caching allocator's slack, which count against the GPU's memory.
RUNTIME_BYTES = {"cpu": 360 * MIB, "cuda": 1 * GIB}
CPU_HEAD_TILE = 1 << 20  # logits per LM-head vocabulary tile on a CPU (dpo_core.headlogp.CPU_TILE_ELEMENTS)


class EstimateError(ValueError):
    """The model's shape cannot be read (no config.json or safetensors files)."""


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelFacts:
    parameters: int  # every stored tensor's elements (a tied LM head counts once)
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    max_positions: int | None
    tied_embeddings: bool
    embedding_parameters: int  # the input embedding table: a lookup, no FLOPs
    head_parameters: int  # a separate LM head's weight (0 when tied to the embedding)
    linears: tuple[tuple[str, int, int], ...]  # (module name, in, out) of every other matrix: what LoRA adapts

    @property
    def body_parameters(self) -> int:
        """Parameters that every token runs through (all but the embedding table and the LM head)."""
        return self.parameters - self.embedding_parameters - self.head_parameters


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header: an 8-byte little-endian length, then JSON."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (struct.error, ValueError) as err:
        raise EstimateError(f"{path.name} is not a safetensors file ({err}); save the model again") from None
    return {name: info["shape"] for name, info in header.items() if name != "__metadata__"}


def _tensor_shapes(model_dir: Path) -> dict[str, list[int]]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise EstimateError(f"{model_dir} holds no .safetensors weights; save the model with save_pretrained "
                            "(safe_serialization) to get an estimate")
    shapes: dict[str, list[int]] = {}
    for name in files:
        shapes.update(_safetensors_shapes(model_dir / name))
    return shapes


def _text_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise EstimateError(f"{model_dir} has no config.json; give a model directory saved by save_pretrained")
    config = json.loads(path.read_text())
    return {**config, **config.get("text_config", {})}  # multimodal configs nest the language model's


def _is_head(name: str) -> bool:
    return name.endswith(("lm_head.weight", "embed_out.weight")) or name == "output.weight"


def model_facts(model_path: str | Path) -> ModelFacts:
    """A local model directory's shape: config.json and the safetensors headers, no weights read."""
    model_dir = Path(model_path)
    if not model_dir.is_dir():
        raise EstimateError(f"{model_path!r} is not a local directory; estimates read config.json and the "
                            "safetensors headers of a model on this machine")
    return _facts(_text_config(model_dir), _tensor_shapes(model_dir))


def live_model_facts(model) -> ModelFacts:
    """A loaded transformers model's shape (a PEFT model's base: its adapters are not the model's), from its
    config and parameters, as `model_facts` reads them from files. Duck-typed, so this module needs no torch.
    A tied LM head is one parameter (named_parameters lists a shared tensor once), as in a saved file."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.to_dict()
    shapes = {name.replace(".base_layer.", "."): list(p.shape) for name, p in base.named_parameters()
              if "lora_" not in name}
    return _facts({**config, **config.get("text_config", {})}, shapes)


def _facts(cfg: dict[str, Any], shapes: dict[str, list[int]]) -> ModelFacts:
    vocab, hidden = int(cfg["vocab_size"]), int(cfg["hidden_size"])
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    head = sum(n for name, n in numel.items() if _is_head(name))
    embedding = sum(n for name, n in numel.items() if "embed" in name and not _is_head(name)
                    and len(shapes[name]) == 2 and vocab in shapes[name])
    linears = tuple((name.removesuffix(".weight"), shape[1], shape[0]) for name, shape in sorted(shapes.items())
                    if len(shape) == 2 and name.endswith(".weight") and "embed" not in name and not _is_head(name))
    return ModelFacts(
        parameters=sum(numel.values()), layers=int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 1),
        hidden_size=hidden, heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads), vocab_size=vocab,
        intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
        max_positions=cfg.get("max_position_embeddings"), tied_embeddings=head == 0,
        embedding_parameters=embedding, head_parameters=head, linears=linears,
    )


def _lora_targets(facts: ModelFacts, targets: list[str] | str) -> list[tuple[str, int, int]]:
    """The matrices PEFT adapts for `target_modules`: all-linear (every one but the LM head), a list of
    names (a module whose name is one, or ends with `.name`), or a regex the whole name must match."""
    if targets == "all-linear":
        return list(facts.linears)
    if isinstance(targets, str):
        return [m for m in facts.linears if re.fullmatch(targets, m[0])]
    return [m for m in facts.linears if any(m[0] == t or m[0].endswith("." + t) for t in targets)]


def trainable_parameters(spec: TrainingSpec, facts: ModelFacts) -> int:
    """Every parameter, or with LoRA the adapters' r x (in + out) per adapted matrix."""
    if spec.lora is None:
        return facts.parameters
    return sum(spec.lora.r * (n_in + n_out) for _, n_in, n_out in _lora_targets(facts, spec.lora.target_modules))


# ---------------------------------------------------------------- the data


@dataclass(frozen=True)
class DataShape:
    """One epoch of training data as the cost model sees it."""

    rows: int  # rows the trainer steps over (kto: after splitting pairs)
    tokens: int  # non-padding tokens of one epoch
    completion_share: float  # share of those tokens the LM head scores (completion tokens)
    mean_sequence: float  # tokens per sequence: the mean context attention works over
    longest_sequence: int  # the longest prompt + completion: what sizes activation memory
    sequences_per_row: int  # 2 for pairs (chosen and rejected rows), 1 for unpaired rows


def shape_of_report(file_report: dict, unpaired: bool) -> DataShape:
    """From a data report's FileReport. Its length percentiles are all it says of prompt against
    completion, so the completion share is taken at the medians."""
    rows, tokens = file_report["rows_used"], file_report["tokens"]["total"]
    p50 = {part: lengths["p50"] for part, lengths in file_report["lengths"].items()}
    completion = p50["completion"] if unpaired else p50["chosen"] + p50["rejected"]
    whole = p50["prompt"] * (1 if unpaired else 2) + completion
    per_row = 1 if unpaired else 2
    return DataShape(rows, tokens, completion / whole if whole else 1.0, tokens / max(rows * per_row, 1),
                     file_report["tokens"]["longest_sequence"], per_row)


def epoch_summary(rows: Iterable) -> dict:
    """What one epoch of tokenized rows (dpo_core.tokenize's TokenizedPair or TokenizedRow) holds, for
    `shape_of_summary`: the trainer reports it with its result."""
    summary = {"rows": 0, "tokens": 0, "completion_tokens": 0, "sequences": 0, "longest_sequence": 0}
    for row in rows:
        completions = [row.chosen_ids, row.rejected_ids] if hasattr(row, "chosen_ids") else [row.completion_ids]
        summary["rows"] += 1
        summary["sequences"] += len(completions)
        for completion in completions:
            summary["tokens"] += len(row.prompt_ids) + len(completion)
            summary["completion_tokens"] += len(completion)
            summary["longest_sequence"] = max(summary["longest_sequence"], len(row.prompt_ids) + len(completion))
    return summary


def shape_of_summary(summary: dict) -> DataShape:
    rows, tokens, sequences = summary["rows"], summary["tokens"], max(summary["sequences"], 1)
    return DataShape(rows, tokens, summary["completion_tokens"] / max(tokens, 1), tokens / sequences,
                     summary["longest_sequence"], max(round(sequences / max(rows, 1)), 1))


# ---------------------------------------------------------------- steps, tokens and FLOPs


def rows_trained(spec: TrainingSpec, rows: int) -> tuple[int, int]:
    """(optimizer steps, rows trained over the run), stepping as the trainer does: spec.total_steps
    steps of batch_size rows, an epoch's last step taking what rows are left."""
    steps = spec.total_steps(rows)
    per_epoch = steps_per_epoch(rows, spec.batch_size)
    if per_epoch == 0:  # no row: nothing to train
        return steps, 0
    full, rest = divmod(steps, per_epoch)
    return steps, full * rows + min(rest * spec.batch_size, rows)


def forward_flops_per_token(facts: ModelFacts, shape: DataShape) -> dict[str, float]:
    """Forward FLOPs per trained token, by part:
    body: 2 x body parameters (every token); head: 2 x vocab x hidden x completion share (dpo_core
    scores completion positions only); attention: 2 x layers x heads x head_dim x mean sequence
    (QK^T and AV, 4 x width x context, over a causal half of the context)."""
    return {
        "body": 2.0 * facts.body_parameters,
        "head": 2.0 * facts.vocab_size * facts.hidden_size * shape.completion_share,
        "attention": 2.0 * facts.layers * facts.heads * facts.head_dim * shape.mean_sequence,
    }


def run_flops(spec: TrainingSpec, facts: ModelFacts, shape: DataShape, tokens: int,
              checkpointed: int | None = None) -> dict[str, float]:
    """FLOPs of training `tokens` tokens, and of the reference model's forward passes.

    policy = tokens x (F + B + R), F the forward
    per token (`forward_flops_per_token`) and B its backward: 2 x F in full fine-tuning (input and weight
    gradients, about 6 x parameters a token in all); with LoRA 1 x F of the frozen matrices (input
    gradients only) + 6 x adapter parameters (the adapters' forward and backward); attention's backward
    is 2 x its forward either way. R, the recompute: the checkpointed share of the decoder layers (of
    `checkpointed`, default `checkpointed_layers`) x F of the body and attention. reference = tokens x F
    with a reference model run every step, one
    epoch's tokens x F with reference_mode: precomputed, 0 for reference-free losses.
    """
    f = forward_flops_per_token(facts, shape)
    forward = sum(f.values())
    matrices = f["body"] + f["head"]
    backward = 2 * f["attention"] + (1 if spec.lora is not None else 2) * matrices
    if spec.lora is not None:
        backward += 6.0 * trainable_parameters(spec, facts)
    layers = checkpointed_layers(spec, facts) if checkpointed is None else checkpointed
    recompute = (f["body"] + f["attention"]) * min(layers, facts.layers) / max(facts.layers, 1)
    policy = tokens * (forward + backward + recompute)
    reference = 0.0
    if spec.loss.needs_reference:
        reference = forward * (shape.tokens if spec.reference_mode == "precomputed" else tokens)
    return {"policy": policy, "reference": reference, "total": policy + reference, "recompute": tokens * recompute}


def training_plan(spec: TrainingSpec, facts: ModelFacts, data_report: dict, checkpointed: int | None = None) -> dict:
    """Steps, tokens and FLOPs of the run `spec` over the training file that `data_report` describes.

    tokens = rows trained x tokens per row (tokens.total x epochs when epochs are whole), stepping as
    the trainer does (`rows_trained`); FLOPs as `run_flops`, with `checkpointed` layers recomputed (a memory
    plan's; default `checkpointed_layers`).
    """
    shape = shape_of_report(data_report["training_file"], spec.loss.unpaired)
    steps, rows = rows_trained(spec, shape.rows)
    tokens = round(rows * shape.tokens / max(shape.rows, 1))
    return {
        "steps": steps, "epochs": round(rows / max(shape.rows, 1), 4), "tokens": tokens,
        "parameters": facts.parameters, "trainable_parameters": trainable_parameters(spec, facts),
        "flops": run_flops(spec, facts, shape, tokens, checkpointed), "precision": spec.precision,
    }


# ---------------------------------------------------------------- memory


def checkpointed_layers(spec: TrainingSpec, facts: ModelFacts) -> int:
    """Decoder layers the spec itself checkpoints: every one (true) or none (false). "auto" leaves it to a
    run's memory plan (dpo_core.memplan), which callers that have one pass instead; without one, none."""
    return facts.layers if spec.gradient_checkpointing is True else 0


def _layer_bytes(spec: TrainingSpec, facts: ModelFacts, width: int = 0) -> int:
    """What autograd keeps for backward per decoder layer and token: two RMSNorms (input, normalised, output:
    6 x hidden), q and o_proj's input and the attention output (3 x hidden), k and v (2 x kv width), the MLP's
    gate, activation, up and product (4 x intermediate). Under bf16/fp16 autocast all but the norms are 16-bit.
    A padded batch's attention mask, [sequences, 1, width, width], reaches SDPA as a float bias that each layer
    converts and keeps: `width` (the batch's padded sequence width) mask entries a token."""
    kv = facts.kv_heads * facts.head_dim
    wide = 3 * facts.hidden_size + 2 * kv + 4 * facts.intermediate_size
    low = FP32 if spec.precision == "fp32" else 2
    return 6 * facts.hidden_size * FP32 + (wide + width) * low


def _activation_bytes(spec: TrainingSpec, facts: ModelFacts, tokens: int, checkpointed: int = 0,
                      width: int = 0) -> int:
    """Activations kept over `tokens` tokens of a micro batch of sequences `width` wide, with `checkpointed`
    of the decoder layers checkpointed: a checkpointed layer keeps only its input (hidden x 4 bytes a token),
    the others every activation (`_layer_bytes`). Backward recomputes one checkpointed layer at a time. The
    checkpointed layers are the first ones (dpo_core.models.checkpoint_layers): backward reaches them after
    the other layers' activations are freed, so the recompute adds one layer to the kept inputs alone, and
    only raises the peak when every layer is checkpointed. Backward of a layer holds about one layer's
    activations more at once (their gradients): measured on a CPU, 0.85-1 x `_layer_bytes`."""
    per_layer, kept_input = _layer_bytes(spec, facts, width), facts.hidden_size * FP32
    k = max(0, min(checkpointed, facts.layers))
    kept = (facts.layers - k) * per_layer + k * kept_input
    recompute = k * kept_input + per_layer if k else 0
    return tokens * (max(kept, recompute) + per_layer)


def _head_bytes(spec: TrainingSpec, facts: ModelFacts, completion_tokens: int, device: str) -> int:
    """The LM head's logits alive at once: a chunk of logprob_chunk_size rows over the vocabulary (on a CPU a
    tile of about 1M logits), the logits and their softmax, fp32."""
    rows = min(spec.logprob_chunk_size, max(completion_tokens, 1))
    logits = rows * facts.vocab_size
    if device == "cpu":
        logits = min(logits, max(CPU_HEAD_TILE, rows * 256))  # a tile at least 256 columns wide
    return 2 * logits * FP32


def _reference_bytes(spec: TrainingSpec, facts: ModelFacts) -> int:
    """A second model: the frozen copy of the policy, or reference_model (assumed the policy's size), in
    16-bit weights under bf16/fp16 but for FSDP (dpo_core.reference.frozen_dtype), else fp32. None with LoRA
    (the base with adapters disabled), for reference-free losses, or once precomputed."""
    if not spec.loss.needs_reference or spec.reference_mode == "precomputed":
        return 0
    if spec.lora is not None and not spec.reference_model:
        return 0
    return facts.parameters * _reference_width(spec)


def _reference_width(spec: TrainingSpec) -> int:
    """Bytes per weight of a separate frozen reference (dpo_core.reference.frozen_dtype)."""
    return 2 if spec.precision != "fp32" and spec.distributed != "fsdp" else FP32


def micro_batch_memory(spec: TrainingSpec, facts: ModelFacts, device: str, tokens: int, completion_share: float,
                       checkpointed: int = 0, gpus: int = 1, width: int = 0) -> dict:
    """Peak bytes of one training process whose micro batches hold `tokens` tokens (padding included) in
    sequences `width` wide, with `checkpointed` decoder layers checkpointed, by term (see docs/training.md,
    Estimates). The one memory model of pre-flight (`memory`) and of a run's plan (dpo_core.memplan):

    weights: fp32 master weights (+ LoRA adapters), and under bf16/fp16 autocast a 16-bit copy of each
    trained weight; gradients: 4 x trainable; optimizer: AdamW's two fp32 states, 8 x trainable;
    reference: `_reference_bytes`; activations: `_activation_bytes` + the LM head's chunk (`_head_bytes`,
    over the completion share of the tokens); runtime: RUNTIME_BYTES. FSDP over `gpus` divides weights,
    gradients, optimizer and reference among them. With reference_mode: precomputed the tabulating pass
    (weights, the reference, no gradients) peaks first; the total is the larger of the two phases.
    """
    trainable = trainable_parameters(spec, facts)
    share = gpus if spec.distributed == "fsdp" and gpus > 1 else 1
    cast = trainable * 2 if spec.precision != "fp32" else 0
    weights = ((facts.parameters + (trainable if spec.lora is not None else 0)) * FP32 + cast) // share
    head = _head_bytes(spec, facts, round(tokens * completion_share), device)
    terms = {
        "weights": weights, "gradients": trainable * FP32 // share,
        "optimizer": ADAMW_STATES * trainable * FP32 // share, "reference": _reference_bytes(spec, facts) // share,
        "activations": _activation_bytes(spec, facts, tokens, checkpointed, width) + head,
        "runtime": RUNTIME_BYTES.get(device, RUNTIME_BYTES["cuda"]),
    }
    total = sum(terms.values())
    if spec.reference_mode == "precomputed" and spec.loss.needs_reference:
        separate = spec.lora is None or bool(spec.reference_model)
        tabulating = (weights + (facts.parameters * _reference_width(spec) // share if separate else 0) + head
                      + terms["runtime"])
        total = max(total, tabulating)
    return {**terms, "total": total}


def memory(spec: TrainingSpec, facts: ModelFacts, data_report: dict, device: str,
           micro_batch_size: int | None = None, gpus: int = 1, checkpointed: int | None = None) -> dict:
    """`micro_batch_memory` of the run over the training file that `data_report` describes: micro_batch_size
    rows (default the spec's micro batch) of the longest sequence (pairs: two sequences a row), with
    `checkpointed` layers checkpointed (default `checkpointed_layers`)."""
    shape = shape_of_report(data_report["training_file"], spec.loss.unpaired)
    rows = micro_batch_size or spec.micro_batch
    tokens = rows * shape.sequences_per_row * shape.longest_sequence
    layers = checkpointed_layers(spec, facts) if checkpointed is None else checkpointed
    return micro_batch_memory(spec, facts, device, tokens, shape.completion_share, layers, gpus,
                              shape.longest_sequence)


def largest_micro_batch(spec: TrainingSpec, facts: ModelFacts, data_report: dict, device: str,
                        capacity_bytes: int, gpus: int = 1, checkpointed: int | None = None) -> int | None:
    """The largest micro_batch_size (up to batch_size) whose `memory` total fits in capacity_bytes; None
    when not even one row fits."""
    def fits(size: int) -> bool:
        return memory(spec, facts, data_report, device, size, gpus, checkpointed)["total"] <= capacity_bytes

    if not fits(1):
        return None
    low, high = 1, spec.batch_size  # fits(low) holds; memory grows with the micro batch
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


# ---------------------------------------------------------------- time


def peak_flops_per_s(gpu_type: str | None, precision: str) -> float | None:
    """A GPU type's stated dense peak for the precision (16-bit tensor cores, or fp32); None for a CPU or
    a GPU type not in GPU_PEAK_FLOPS."""
    if gpu_type not in GPU_PEAK_FLOPS:
        return None
    bf16, fp32 = GPU_PEAK_FLOPS[gpu_type]
    return fp32 if precision == "fp32" else bf16


def _model_rate(device: str, peak: float | None, precision: str) -> float:
    """FLOP/s assumed without calibration: MFU_GPU of the peak (UNKNOWN_GPU_PEAK for an unknown GPU)."""
    if device == "cpu":
        return CPU_FLOPS_PER_S
    return MFU_GPU * (peak or UNKNOWN_GPU_PEAK[1 if precision == "fp32" else 0])


def _nearest(plan: dict, runs: list[dict]) -> list[dict]:
    """The runs of the model size nearest the plan's (by the ratio of parameter counts), up to five."""
    def distance(m: dict) -> float:
        return abs(math.log(max(m["parameters"], 1) / max(plan["parameters"], 1)))

    best = min(distance(m) for m in runs)
    return [m for m in runs if distance(m) <= best + 1e-9][:5]


def seconds(plan: dict, calibration: list[dict], device: str, gpu_type: str | None = None, gpus: int = 1) -> dict:
    """Expected seconds of the run `plan` (training_plan's) on `gpus` devices of `gpu_type`.

    calibrated: runs (Measured dicts, each with its job's id under "job_id") on the same device, GPU
    type and precision, of the model size nearest the plan's, give FLOPs per second per device
    (their FLOPs over their train seconds x gpus); seconds = plan FLOPs / (that x gpus). flops_model:
    MFU_GPU x the GPU's stated peak, or CPU_FLOPS_PER_S on a CPU. mfu: the rate over the GPU type's stated
    peak, where it has one. The caller passes calibration newest first; the first five of the nearest size count.
    """
    gpu_type = "cpu" if device == "cpu" else gpu_type
    peak = peak_flops_per_s(gpu_type, plan["precision"])
    runs = [m for m in calibration if m.get("device") == device and m.get("precision") == plan["precision"]
            and (gpu_type is None or m.get("gpu_type") == gpu_type) and m.get("flops") and m.get("train_seconds")]
    if runs:
        used = _nearest(plan, runs)
        rate = sum(m["flops"] for m in used) / sum(m["train_seconds"] * (m.get("gpus") or 1) for m in used)
        basis, by = "calibrated", [m["job_id"] for m in used if m.get("job_id")]
    else:
        rate, basis, by = _model_rate(device, peak, plan["precision"]), "flops_model", []
    return {"seconds": plan["flops"]["total"] / (rate * max(gpus, 1)), "basis": basis, "calibrated_by": by,
            "flops_per_s": rate, "mfu": None if peak is None else round(rate / peak, 4)}


# ---------------------------------------------------------------- what a run measured


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, the high-water mark of this program's own memory.
    Not ru_maxrss there: it carries over an exec, so a process started by a larger one (a worker's training
    process, a test's child) would report its parent's peak when that is higher. Elsewhere ru_maxrss
    (bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measured(spec: TrainingSpec, result, gpu_type: str, gpus: int, facts: ModelFacts | None = None) -> dict:
    """The Measured dict a worker stores in jobs.measured for a finished run (result: dpo_core's TrainResult):

    train_seconds (time in optimizer steps), steps, tokens, tokens_per_s, parameters, trainable_parameters,
    precision, gpu_type, gpus, device ("cpu" | "cuda"), peak_memory_bytes and memory_kind ("rss": the
    training process's peak resident memory; "cuda_allocated": torch.cuda.max_memory_allocated, without
    the CUDA context), flops (`run_flops` of the tokens trained, counting only work inside the timed
    steps: a precomputed reference's pass is not), lora, and the memory plan it ran with (result.memory_plan,
    dpo_core.memplan): micro_batch_size, checkpointed_layers, gradient_checkpointing (whether any layer was),
    memory_budget_bytes and predicted_memory_bytes. flops is None when the model's shape cannot be read
    (`model_facts`).
    """
    plan = getattr(result, "memory_plan", None) or {}  # a result from before plans: none
    layers = plan.get("checkpointed_layers")
    flops = None
    if facts is not None and result.epoch:
        work = run_flops(spec, facts, shape_of_summary(result.epoch), result.trained_tokens, layers)
        flops = work["policy"] + (0.0 if spec.reference_mode == "precomputed" else work["reference"])
    return {
        "train_seconds": round(result.train_seconds, 3), "steps": result.global_step, "tokens": result.trained_tokens,
        "tokens_per_s": round(result.trained_tokens / result.train_seconds, 2) if result.train_seconds else None,
        "parameters": result.parameters, "trainable_parameters": result.trainable_parameters,
        "precision": spec.precision, "gpu_type": gpu_type, "gpus": gpus, "device": result.device,
        "peak_memory_bytes": result.peak_memory_bytes, "memory_kind": result.memory_kind, "flops": flops,
        "lora": spec.lora is not None, "micro_batch_size": plan.get("micro_batch", spec.micro_batch),
        "checkpointed_layers": layers,
        "gradient_checkpointing": bool(layers) if layers is not None else spec.gradient_checkpointing is True,
        "memory_budget_bytes": plan.get("budget_bytes"), "predicted_memory_bytes": plan.get("predicted_bytes"),
    }
