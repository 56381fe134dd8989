"""TrainingSpec: the one schema of a training run, shared by `dpo-train`, the REST API and the worker.

Imports no torch: the API validates specs with it and must stay light.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Kept in step with dpo_core.losses.LOSSES (a unit test checks both lists agree). It lives here too so
# that validating a spec never needs torch.
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto")
# Losses that never look at a reference model: no reference is loaded for them.
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo"})
# Losses that train on unpaired (prompt, completion, label) rows.
UNPAIRED_LOSSES = frozenset({"kto"})

# Fields that name paths on the machine that runs the job. The service sets them; requests may not.
SERVER_PATH_FIELDS = ("train_file", "validation_file", "output_dir", "resume_from")


class SpecError(ValueError):
    """A training spec is invalid. `problems` lists every problem as (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in problems)
        super().__init__(f"invalid training spec ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}")


class _Strict(BaseModel):
    # Unknown keys are typos more often than not: reject them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GroupSpec(_Strict):
    """Per-group settings for multi-reward DPO."""

    beta: float = Field(gt=0, description="beta for rows of this group")
    weight: float = Field(1.0, ge=0, description="weight of this group's rows in the loss")


class LossSpec(_Strict):
    type: str = Field("sigmoid", description=f"one of {', '.join(LOSS_TYPES)}")
    beta: float = Field(0.1, gt=0, description="inverse temperature of the implicit reward")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO / robust: assumed label-flip rate")
    gamma: float = Field(0.5, description="simpo: target reward margin")
    orpo_lambda: float = Field(0.1, ge=0, description="orpo: weight of the odds-ratio term")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable rows")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable rows")
    sft_weight: float = Field(0.0, ge=0, description="weight of an NLL term on the chosen completion (RPO)")
    beta_by_group: dict[str, GroupSpec | float] = Field(
        default_factory=dict, description="multi-reward DPO: a beta (and optional weight) per row `group`"
    )

    @model_validator(mode="after")
    def _check_type(self) -> LossSpec:
        if self.type not in LOSS_TYPES:
            raise ValueError(f"unknown loss type {self.type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if self.label_smoothing and self.type not in ("sigmoid", "robust"):
            raise ValueError("label_smoothing applies only to the sigmoid and robust losses")
        return self

    def group(self, name: str | None) -> GroupSpec:
        """The beta and weight that apply to rows of group `name` (None: the default group)."""
        found = self.beta_by_group.get(name) if name is not None else None
        if found is None:
            return GroupSpec(beta=self.beta, weight=1.0)
        return found if isinstance(found, GroupSpec) else GroupSpec(beta=found, weight=1.0)

    @property
    def needs_reference(self) -> bool:
        return self.type not in REFERENCE_FREE_LOSSES

    @property
    def unpaired(self) -> bool:
        return self.type in UNPAIRED_LOSSES


class LoraSpec(_Strict):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        "all-linear", description="module names to adapt, or 'all-linear'"
    )


class TrainingSpec(_Strict):
    """Everything one training run needs. Paths are local to the machine that runs it."""

    # What to train, on what, where to write.
    model: str = Field(description="local directory or hub id of a causal LM")
    reference_model: str | None = Field(
        None, description="default: a frozen copy of `model` (with LoRA: the base with adapters disabled)"
    )
    train_file: str = Field(description="JSONL preference data")
    validation_file: str | None = None
    output_dir: str = "runs/dpo"

    loss: LossSpec = Field(default_factory=LossSpec)

    # Optimisation.
    learning_rate: float = Field(5e-6, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="None disables clipping")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    batch_size: int = Field(8, gt=0, description="preference pairs (or KTO rows) per optimizer step")
    micro_batch_size: int | None = Field(
        None, gt=0, description="rows per forward pass; gradient accumulation reaches batch_size"
    )
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=0, description="0: evaluate only; overrides num_epochs")
    seed: int = 42

    # Sequences.
    max_length: int = Field(1024, gt=1, description="prompt + completion tokens")
    max_prompt_length: int | None = Field(512, gt=0)
    group_by_length: bool = Field(True, description="batch rows of similar length to cut padding")
    pad_to_multiple_of: int | None = Field(
        None, gt=0, description="round each batch's length up to a multiple of this; default: 64 on a GPU, 1 on a CPU"
    )

    # Compute.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    device: str | None = Field(None, description="default: cuda if available, else cpu")
    logprob_chunk_size: int = Field(1024, gt=0, description="completion positions per LM-head chunk")
    lora: LoraSpec | None = None
    distributed: Literal["ddp", "fsdp"] | None = Field(
        None, description="how several processes share the work (dpo-train --nproc N): ddp, or fsdp (FSDP2)"
    )
    reference_mode: Literal["model", "precomputed"] = "model"
    share_prompt: bool | Literal["auto"] = Field(
        False,
        description="pairs: one row `prompt, chosen, rejected` per pair, so the prompt runs through the model "
        "once (needs SDPA attention and a body/head model); auto: when the model allows it",
    )

    # Logging, evaluation, checkpoints.
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="default: evaluate only at the end")
    eval_on_start: bool = Field(False, description="also evaluate before the first step (a 'before' baseline)")
    eval_batch_size: int | None = Field(None, gt=0)
    save_steps: int | None = Field(None, gt=0, description="default: only the final model")
    save_total_limit: int | None = Field(None, gt=0)
    resume_from: str | None = Field(None, description="a checkpoint directory, or 'auto'")

    @model_validator(mode="after")
    def _check_cross_fields(self) -> TrainingSpec:
        problems = []
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            problems.append("micro_batch_size must not exceed batch_size")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            problems.append("max_prompt_length must be below max_length, to leave room for the completion")
        if self.max_steps == 0 and not self.validation_file:
            problems.append("max_steps: 0 evaluates only, and needs a validation_file")
        if self.reference_mode == "precomputed" and not self.loss.needs_reference:
            problems.append(f"loss {self.loss.type!r} uses no reference model; drop reference_mode: precomputed")
        if self.distributed == "fsdp" and self.lora is not None:
            problems.append("fsdp shards full-model training; LoRA adapters are small, use distributed: ddp")
        if self.distributed == "fsdp" and self.precision == "fp16":
            problems.append("fsdp trains in fp32 or bf16; fp16 needs a sharded grad scaler, use bf16")
        if self.share_prompt is True and self.loss.unpaired:
            problems.append(f"share_prompt needs pairs; loss {self.loss.type!r} trains on unpaired rows")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size

    @property
    def accumulation_steps(self) -> int:
        return -(-self.batch_size // self.micro_batch)


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "spec"
        msg = e["msg"].removeprefix("Value error, ")
        out.append((loc, msg))
    return out


def parse_spec(data: dict[str, Any]) -> TrainingSpec:
    """Validate a mapping into a TrainingSpec, raising SpecError that names every problem at once."""
    try:
        return TrainingSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_problems(err)) from None


def _parse_value(text: str) -> Any:
    # `--set loss.beta=0.2` and `--set lora=null` should give numbers and None, not strings.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to a nested mapping (a copy)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError([(item, "an override must look like key=value, e.g. loss.beta=0.2")])
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = _parse_value(value)
    return out


def load_spec(path: str | Path, overrides: list[str] | None = None) -> TrainingSpec:
    """Read a YAML or JSON config file, apply overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([("config", f"file not found: {path}")])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpecError([("config", f"{path} is not valid YAML or JSON: {err}")]) from None
    if not isinstance(data, dict):
        raise SpecError([("config", f"{path} must hold a mapping of settings")])
    return parse_spec(apply_overrides(data, overrides or []))
