"""TrainingSpec: the one schema of a training run, shared by `dpo-train`, the REST API and the worker.

Imports no torch: the API validates specs with it and must stay light.

Every number has a range (the table in docs/api.md is generated from this module, see dpo_core.fields):
wide enough for real runs (7B models, 128k-token sequences, batches in the thousands), tight enough
that no value in range makes the trainer overflow by construction or the worker refuse the run.
Numbers are taken strictly: a boolean or a string is never a number (an int is a float). A value the
user did not set never makes a spec invalid: a default that depends on another field follows it.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Kept in step with dpo_core.losses.LOSSES (a unit test checks both lists agree). It lives here too so
# that validating a spec never needs torch.
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto")
# Losses that never look at a reference model: no reference is loaded for them.
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo"})
# Losses that train on unpaired (prompt, completion, label) rows.
UNPAIRED_LOSSES = frozenset({"kto"})

# Where a run can report its metrics besides metrics.jsonl (dpo_core.reporting), each an optional package.
REPORT_TO = ("tensorboard", "mlflow", "wandb")
ReportTo = Literal["tensorboard", "mlflow", "wandb"]

# Fields that name paths on the machine that runs the job. The service sets them; requests may not.
SERVER_PATH_FIELDS = ("train_file", "validation_file", "output_dir", "resume_from", "adapter", "reference_cache")

MAX_STEPS = 10_000_000  # optimizer steps of one run, however they are asked for (max_steps, epochs)
MAX_ROWS = 65_536  # rows of one optimizer step, of one forward pass
MAX_LENGTH = 131_072  # tokens of prompt + completion
MAX_DEVICE_INDEX = 63  # cuda:N; a job asks for at most 64 GPUs
MAX_LEARNING_RATE = 0.1
DEFAULT_MAX_LENGTH = 1024
DEFAULT_MAX_PROMPT_LENGTH = 512
DEVICE_RANGE = f"cpu, cuda, cuda:0 ... cuda:{MAX_DEVICE_INDEX}"
# max_memory: bytes (an int), or a decimal number and a unit: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB
# (powers of 1024); case-insensitive, a space allowed between. From about a small CPU run to a 64-GPU node's host.
MEMORY_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
MIN_MEMORY, MAX_MEMORY = 256 << 20, 64 << 40
MEMORY_RANGE = "256MiB to 64TiB: bytes, or a number and a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"


def _float(**bounds: float) -> Any:
    """A finite float within `bounds` (ge, gt, le, lt); an int is taken, a bool or a string is not."""
    return Annotated[float, Field(strict=True, allow_inf_nan=False, **bounds)]


def _int(**bounds: int) -> Any:
    """An int within `bounds`; a bool, a float (even 8.0) or a string is not taken."""
    return Annotated[int, Field(strict=True, **bounds)]


# Ranges. The loss sees beta times a difference of summed log-probs, and ipo 1 / (2 beta), squared: both
# stay far inside float32 over this range. AdamW's update is about learning_rate per weight per step, and
# weight decay shrinks a weight by learning_rate * weight_decay per step: both stay below 1.
Beta = _float(ge=1e-4, le=100)
LearningRate = _float(gt=0, le=MAX_LEARNING_RATE)
WeightDecay = _float(ge=0, le=1)
GradNorm = _float(gt=0, le=1e6)
AdamBeta1 = _float(ge=0, le=0.9999)
AdamBeta2 = _float(ge=0, le=0.99999)  # 1 - beta2 must stay distinct from 0 in float32
AdamEpsilon = _float(ge=1e-12, le=1)  # a zero gradient gives 0 / (0 + eps): eps must be a float32 above 0
Epochs = _float(gt=0, le=1000)
Rows = _int(ge=1, le=MAX_ROWS)
Steps = _int(ge=1, le=MAX_STEPS)
StepsOrZero = _int(ge=0, le=MAX_STEPS)
Seed = _int(ge=0, le=2**63 - 1)
Length = _int(ge=2, le=MAX_LENGTH)
PromptLength = _int(ge=1, le=MAX_LENGTH - 1)
PadMultiple = _int(ge=1, le=1024)
ChunkSize = _int(ge=1, le=MAX_LENGTH)
Weight = _float(ge=0, le=100)
PositiveWeight = _float(gt=0, le=100)
Smoothing = _float(ge=0, le=0.49)  # robust divides by 1 - 2 * label_smoothing
Margin = _float(ge=0, le=100)
LoraRank = _int(ge=1, le=1024)
LoraAlpha = _float(gt=0, le=4096)
Dropout = _float(ge=0, le=0.9)  # kept activations are scaled by 1 / (1 - dropout)
SaveLimit = _int(ge=1, le=1000)
Patience = _int(ge=1, le=1000)
MinDelta = _float(ge=0, le=1e6)
# An evaluation record's key (dpo_core.step.evaluate): eval_loss, eval_rewards/accuracies, eval_loss/<group>...
SampleCount = _int(ge=1, le=64)  # prompts sampled: one generate() batch of them
NewTokens = _int(ge=1, le=4096)
Temperature = _float(ge=0, le=10)
Share = _float(ge=0.01, le=1)
EvalMetric = Annotated[str, Field(max_length=256)]
GroupName = Annotated[str, Field(min_length=1, max_length=256)]
ModuleName = Annotated[str, Field(min_length=1, max_length=256)]


def _doc(range_text: str | None = None, default_text: str | None = None, *, choices: tuple = (),
         examples: tuple = ()) -> dict[str, Any]:
    """What the table of ranges (dpo_core.fields) shows where the type alone cannot say it: the range or
    default in words, the values of a string checked by a validator, values in range to test."""
    extra = {"range_text": range_text, "default_text": default_text, "choices": list(choices),
             "examples": list(examples)}
    return {k: v for k, v in extra.items() if v}


class SpecError(ValueError):
    """A training spec is invalid. `problems` lists every problem as (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in problems)
        super().__init__(f"invalid training spec ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}")


class CrossFieldError(ValueError):
    """Problems that involve several fields, each as (the field to change, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{loc}: {msg}" for loc, msg in problems))


class _Strict(BaseModel):
    # Unknown keys are typos more often than not: reject them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class GroupSpec(_Strict):
    """Per-group settings for multi-reward DPO."""

    beta: Beta | None = Field(None, description="beta for rows of this group",
                              json_schema_extra=_doc(default_text="loss.beta"))
    weight: Weight = Field(1.0, description="weight of this group's rows in the loss (0 leaves them out)")


class LossSpec(_Strict):
    type: str = Field("sigmoid", description="the preference loss (docs/training.md, Losses)",
                      json_schema_extra=_doc(choices=LOSS_TYPES))
    beta: Beta = Field(0.1, description="inverse temperature of the implicit reward")
    label_smoothing: Smoothing = Field(
        0.0, description="assumed rate of flipped labels; above 0 only with the sigmoid (cDPO) and robust losses")
    gamma: Margin = Field(0.5, description="simpo: target reward margin")
    orpo_lambda: Weight = Field(0.1, description="orpo: weight of the odds-ratio term")
    desirable_weight: PositiveWeight = Field(1.0, description="kto: weight of desirable rows")
    undesirable_weight: PositiveWeight = Field(1.0, description="kto: weight of undesirable rows")
    sft_weight: Weight = Field(0.0, description="weight of an NLL term on the chosen completion (RPO)")
    beta_by_group: dict[GroupName, GroupSpec] = Field(
        default_factory=dict, max_length=256,
        description="multi-reward DPO: per row `group` (up to 256 names), a beta or {beta, weight}",
    )

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in LOSS_TYPES:
            raise ValueError(f"unknown loss type {value!r}; choose one of {', '.join(LOSS_TYPES)}")
        return value

    @field_validator("beta_by_group", mode="before")
    @classmethod
    def _beta_alone(cls, value: Any) -> Any:
        # `{group: 0.3}` is short for `{group: {beta: 0.3}}`; a bool stays a bool, and is refused.
        if not isinstance(value, dict):
            return value
        return {k: {"beta": v} if _is_number(v) else v for k, v in value.items()}

    @model_validator(mode="after")
    def _check_label_smoothing(self) -> LossSpec:
        if self.label_smoothing and self.type not in ("sigmoid", "robust"):
            raise CrossFieldError([("label_smoothing", f"applies only to the sigmoid and robust losses, not "
                                    f"{self.type!r}; remove it or set it to 0")])
        return self

    def group(self, name: str | None) -> GroupSpec:
        """The beta and weight that apply to rows of group `name` (None: the default group)."""
        found = self.beta_by_group.get(name) if name is not None else None
        if found is None:
            return GroupSpec(beta=self.beta, weight=1.0)
        return found if found.beta is not None else GroupSpec(beta=self.beta, weight=found.weight)

    @property
    def needs_reference(self) -> bool:
        return self.type not in REFERENCE_FREE_LOSSES

    @property
    def unpaired(self) -> bool:
        return self.type in UNPAIRED_LOSSES


class LoraSpec(_Strict):
    r: LoraRank = Field(8, description="adapter rank")
    alpha: LoraAlpha = Field(16, description="adapters are scaled by alpha / r")
    dropout: Dropout = Field(0.0, description="dropout on the adapters' input")
    target_modules: Annotated[list[ModuleName], Field(min_length=1, max_length=1024)] | str = Field(
        "all-linear", description="module names to adapt (1 to 1024), 'all-linear', or a regular expression "
        "the whole module name must match",
        json_schema_extra=_doc("names, all-linear, or a regex",
                               examples=("all-linear", ["q_proj", "v_proj"], "q_proj|v_proj")),
    )

    @field_validator("target_modules")
    @classmethod
    def _pattern_compiles(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            if not value or len(value) > 1024:
                raise ValueError("give 'all-linear', module names, or a regular expression of 1 to 1024 characters")
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{value!r} is not a valid regular expression ({err}); give module names as "
                                 "a list") from None
        return value


def lower_is_better(metric: str) -> bool:
    """The default direction of an evaluation metric: down for a loss, up for the rest (accuracies,
    margins, chosen rewards)."""
    name = metric.removeprefix("eval_")
    return name.startswith("loss") or name.endswith("loss")


class EarlyStoppingSpec(_Strict):
    """Stop when an evaluation metric has not improved for `patience` evaluations in a row."""

    metric: EvalMetric = Field(
        "eval_loss", description="an evaluation record's key (docs/training.md, Metrics)",
        json_schema_extra=_doc("an eval_ metric name", examples=("eval_loss", "eval_rewards/accuracies")))
    mode: Literal["min", "max"] | None = Field(
        None, description="min: lower is better; max: higher is better",
        json_schema_extra=_doc(default_text="min for a loss, max for any other metric"))
    patience: Patience = Field(3, description="evaluations in a row without improvement before the run stops")
    min_delta: MinDelta = Field(0.0, description="an evaluation improves on the best only by more than this")

    @field_validator("metric")
    @classmethod
    def _an_eval_metric(cls, value: str) -> str:
        if not re.fullmatch(r"eval_[\w./-]+", value):
            raise ValueError(f"{value!r} is not an evaluation metric: give an evaluation record's key, such as "
                             f"eval_{value.removeprefix('eval_') or 'loss'} or eval_rewards/accuracies")
        return value

    @model_validator(mode="after")
    def _resolve_mode(self) -> EarlyStoppingSpec:
        if self.mode is None:  # follows the metric, written into the field so the dumped spec is what runs
            self.__dict__["mode"] = "min" if lower_is_better(self.metric) else "max"
        return self


class SamplesSpec(_Strict):
    """Completions of fixed prompts (validation, or held out of training), generated at step 0 (the reference's) and during training
    (the policy's): what the model now says (dpo_core.samples)."""

    num_prompts: SampleCount = Field(4, description="the validation file's first this many distinct prompts, in "
                                     "file order; without one, the training file's, whose rows are then held out "
                                     "of training")
    max_new_tokens: NewTokens = Field(32, description="tokens generated per completion at most; generation stops at EOS")
    temperature: Temperature = Field(0.0, description="0: greedy; above 0: sampled, seeded by seed and the step")
    every: Steps | None = Field(
        None, description="generate every this many steps (and at the last step); null: at each evaluation "
        "(without a validation file: at step 0 and the last step only)",
        json_schema_extra=_doc(default_text="eval_steps, and the last step"))
    max_share: Share = Field(
        0.1, description="a sampling step between step 0 and the last is skipped when it would take samples over "
        "this share of the run's time so far; 1: never skipped")
    reward_model: str | None = Field(
        None, description="a sequence-classification model that scores both completions; its win rate becomes the "
        "metric samples/win_rate", json_schema_extra=_doc("a hub id, or a directory under DPO_MODEL_DIRS"))


class TrainingSpec(_Strict):
    """Everything one training run needs. Paths are local to the machine that runs it."""

    # What to train, on what, where to write.
    model: str = Field(description="local directory or hub id of a causal LM")
    reference_model: str | None = Field(
        None, description="default: a frozen copy of `model` (with LoRA: the base with adapters disabled; with "
        "`adapter`: the base with that adapter, as it was at the start)"
    )
    adapter: str | None = Field(
        None, description="a LoRA adapter directory to train further on `model` (a LoRA checkpoint, or a final "
        "model's adapter/); it keeps its own r, alpha and target_modules; needs lora")
    train_file: str = Field(description="JSONL preference data")
    validation_file: str | None = None
    output_dir: str = "runs/dpo"

    loss: LossSpec = Field(default_factory=LossSpec, description="the loss and its parameters")

    # Optimisation.
    learning_rate: LearningRate = Field(5e-6, description="AdamW's peak learning rate")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("linear", description="after the warm-up")
    warmup_steps: StepsOrZero = Field(0, description="steps of linear warm-up from 0")
    weight_decay: WeightDecay = Field(0.0, description="AdamW's decoupled weight decay (not on 1-D weights)")
    max_grad_norm: GradNorm | None = Field(1.0, description="gradient clipping; null disables it")
    adam_beta1: AdamBeta1 = Field(0.9, description="AdamW's first-moment decay")
    adam_beta2: AdamBeta2 = Field(0.999, description="AdamW's second-moment decay")
    adam_epsilon: AdamEpsilon = Field(1e-8, description="AdamW's denominator term")
    batch_size: Rows = Field(8, description="preference pairs (or KTO rows) per optimizer step")
    micro_batch_size: Rows | None = Field(
        None, description="rows per forward pass, at most batch_size (cut to a batch_size left at its default); "
        "gradient accumulation reaches batch_size", json_schema_extra=_doc(default_text="batch_size"),
    )
    num_epochs: Epochs = Field(1.0, description=f"passes over the training rows; at most {MAX_STEPS:,} steps in all")
    max_steps: StepsOrZero | None = Field(
        None, description="overrides num_epochs; 0: evaluate only (needs a validation file)",
        json_schema_extra=_doc(default_text="from num_epochs"))
    seed: Seed = Field(42, description="data order and initialisation")

    # Sequences.
    max_length: Length = Field(
        DEFAULT_MAX_LENGTH, description="prompt + completion tokens",
        json_schema_extra=_doc(default_text="1024, or 2 x max_prompt_length when that is set (at most 131072)"),
    )
    max_prompt_length: PromptLength | None = Field(
        DEFAULT_MAX_PROMPT_LENGTH, description="the prompt keeps its last this many tokens, below max_length; "
        "null: no limit of its own (as TRL 1.16)",
        json_schema_extra=_doc(default_text="min(512, max_length // 2)"),
    )
    group_by_length: bool = Field(True, description="batch rows of similar length to cut padding")
    pad_to_multiple_of: PadMultiple | None = Field(
        None, description="round each batch's length up to a multiple of this",
        json_schema_extra=_doc(default_text="64 on a GPU, 1 on a CPU"),
    )

    # Compute.
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16/fp16: autocast over fp32 weights (fp16 with a grad scaler, not with fsdp)")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute decoder layers' activations in backward instead of keeping them: true every "
        "layer, false none; auto: as few layers as fit max_memory (docs/training.md, Memory)")
    max_memory: int | str | None = Field(
        None, description="the memory budget of one training process; the run plans its micro batch and "
        "checkpointed layers to fit it, and fails early when nothing fits",
        json_schema_extra=_doc(MEMORY_RANGE, "90% of the device's memory (a GPU's, or on a CPU the process's "
                               "cgroup limit, else the machine's)", examples=(MIN_MEMORY, "40GiB", "1.5TB", "64TiB")))
    compile: bool = Field(
        False, description="torch.compile each decoder layer of the policy and of a frozen reference model (norms, "
        "rotary embeddings, activations fused; the embedding, LM head and generation stay eager); the first steps "
        "pay the compile time (docs/training.md, Compiling the decoder layers)")
    device: str | None = Field(None, description="null: cuda if available, else cpu",
                               json_schema_extra=_doc(DEVICE_RANGE, examples=("cpu", "cuda", "cuda:0", "cuda:63")))
    logprob_chunk_size: ChunkSize = Field(1024, description="completion positions per LM-head chunk")
    lora: LoraSpec | None = Field(None, description="train LoRA adapters (PEFT) instead of every weight")
    distributed: Literal["ddp", "fsdp"] | None = Field(
        None, description="how several processes (dpo-train --nproc N, a job's gpus) share the work; fsdp (FSDP2) "
        "not with lora",
        json_schema_extra=_doc(default_text="ddp with several processes"),
    )
    reference_mode: Literal["model", "precomputed"] = Field(
        "model", description="precomputed: tabulate the reference log-probs once, then free the reference model "
        "(losses with a reference only)")
    reference_cache: str | None = Field(
        None, description="a directory of precomputed reference log-probs: a run reads its tables there when an "
        "earlier run with the same reference, data and sequence settings wrote them, else writes them there "
        "(reference_mode: precomputed; docs/training.md)")
    share_prompt: bool | Literal["auto"] = Field(
        False,
        description="one row `prompt, chosen, rejected` per pair, so the prompt runs through the model once "
        "(pairs only, not kto; needs SDPA attention and a body/head model); auto: when the model allows it",
    )
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="every sequence of a micro batch in one row, no padding, attention kept within each sequence "
        "(needs a body/head model without sliding-window or soft-capped attention); auto: on a GPU in bf16/fp16 "
        "when the model allows it and share_prompt is not true",
    )

    # Logging, evaluation, checkpoints.
    logging_steps: Steps = Field(10, description="a metrics record every this many steps")
    eval_steps: Steps | None = Field(None, description="evaluate every this many steps; null: only at the end")
    eval_on_start: bool = Field(False, description="also evaluate before the first step (a 'before' baseline)")
    eval_batch_size: Rows | None = Field(None, description="rows per evaluation forward pass",
                                         json_schema_extra=_doc(default_text="the micro batch"))
    save_steps: Steps | None = Field(None, description="a checkpoint every this many steps; null: only the final model")
    save_total_limit: SaveLimit | None = Field(
        None, description="checkpoints kept: the latest this many, plus the best evaluation's (by "
        "early_stopping.metric, else eval_loss); null keeps every one")
    early_stopping: EarlyStoppingSpec | None = Field(
        None, description="end the run when an evaluation metric stops improving; the final model is then the best "
        "evaluation's; needs a validation file and eval_steps")
    load_best_at_end: bool = Field(
        False, description="the final model is the best evaluation's weights (by early_stopping.metric, else "
        "eval_loss), not the last step's; needs a validation file and eval_steps")
    samples: SamplesSpec | None = Field(
        None, description="generate completions of fixed prompts at step 0 and during training (docs/training.md, "
        "Samples); needs a loss with a reference model")
    resume_from: str | None = Field(None, description="a checkpoint directory, or 'auto'")
    report_to: Annotated[list[ReportTo], Field(max_length=len(REPORT_TO))] = Field(
        default_factory=list, description="also report metrics to these (docs/training.md, Tracking); each needs "
        "its package where the run trains",
        json_schema_extra=_doc("a list of: " + ", ".join(REPORT_TO), "[]",
                               examples=([], ["tensorboard"], list(REPORT_TO))),
    )

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names a tracker twice; list each once")
        return value

    @field_validator("max_memory")
    @classmethod
    def _memory_in_range(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            memory_bytes(value)  # raises ValueError with the grammar and range
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        found = re.fullmatch(r"cpu|cuda(?::(\d{1,2}))?", value) if value is not None else True
        if not found or (found is not True and found.group(1) and int(found.group(1)) > MAX_DEVICE_INDEX):
            raise ValueError(f"must be one of {DEVICE_RANGE}, or null to pick cuda when there is a GPU")
        return value

    @model_validator(mode="after")
    def _check_cross_fields(self) -> TrainingSpec:
        self._resolve_defaults()
        problems = []
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            problems.append(("micro_batch_size", f"must not exceed batch_size ({self.batch_size})"))
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            problems.append(("max_prompt_length", f"must be below max_length ({self.max_length}), to leave room "
                             "for the completion"))
        if self.max_steps == 0 and not self.validation_file:
            problems.append(("max_steps", "0 evaluates only, and needs a validation_file"))
        if self.reference_mode == "precomputed" and not self.loss.needs_reference:
            problems.append(("reference_mode", f"loss {self.loss.type!r} uses no reference model; drop "
                             "reference_mode: precomputed"))
        if self.reference_cache is not None and self.reference_mode != "precomputed":
            problems.append(("reference_cache", "holds precomputed reference log-probs; set reference_mode: "
                             "precomputed, or drop reference_cache"))
        if self.adapter is not None and self.lora is None:
            problems.append(("lora", "an adapter trains further as LoRA: set lora (the adapter's own r, alpha and "
                             "target_modules apply), or drop adapter to train the whole model"))
        if self.distributed == "fsdp" and self.lora is not None:
            problems.append(("distributed", "fsdp shards full-model training; LoRA adapters are small, use ddp"))
        if self.distributed == "fsdp" and self.precision == "fp16":
            problems.append(("precision", "fsdp trains in fp32 or bf16; fp16 needs a sharded grad scaler, use bf16"))
        if self.share_prompt is True and self.loss.unpaired:
            problems.append(("share_prompt", f"needs pairs; loss {self.loss.type!r} trains on unpaired rows"))
        if self.share_prompt is True and self.packing is True:
            problems.append(("packing", "and share_prompt are two layouts of a batch; set one of them to false"))
        problems += self._best_problems() + self._samples_problems()
        if problems:
            raise CrossFieldError(problems)
        return self

    def _best_problems(self) -> list[tuple[str, str]]:
        """early_stopping and load_best_at_end compare evaluations made during training."""
        name = "early_stopping" if self.early_stopping is not None else "load_best_at_end"
        if self.early_stopping is None and not self.load_best_at_end:
            return []
        missing = [what for what, given in (("a validation_file", self.validation_file),
                                            ("eval_steps", self.eval_steps)) if not given]
        if missing:
            return [(name, f"compares evaluations made during training, and needs {' and '.join(missing)}: "
                     f"set {' and '.join(m.removeprefix('a ') for m in missing)}, or remove {name}")]
        return []

    def _samples_problems(self) -> list[tuple[str, str]]:
        """Samples score completions under a live reference."""
        if self.samples is None:
            return []
        problems = []
        if not self.loss.needs_reference or self.reference_mode == "precomputed":
            why = (f"loss {self.loss.type!r} has none" if not self.loss.needs_reference
                   else "reference_mode: precomputed frees it; use reference_mode: model")
            problems.append(("samples", f"scores completions under the reference model, and {why}"))
        if self.distributed == "fsdp":
            problems.append(("samples", "generates on one process, and fsdp shards the weights; use ddp or "
                             "remove samples"))
        return problems

    @property
    def best_metric(self) -> tuple[str, str]:
        """(metric, mode) by which evaluations rank: which checkpoint is the best one."""
        found = self.early_stopping
        return (found.metric, found.mode) if found is not None else ("eval_loss", "min")

    def _resolve_defaults(self) -> None:
        """Defaults that follow a field the user set, so that no default ever conflicts with it. Written
        straight into the fields (no re-validation), so the spec as dumped is the spec that runs."""
        given = self.model_fields_set
        if "max_prompt_length" not in given:
            self.__dict__["max_prompt_length"] = min(DEFAULT_MAX_PROMPT_LENGTH, self.max_length // 2)
        elif "max_length" not in given and self.max_prompt_length is not None:
            self.__dict__["max_length"] = min(MAX_LENGTH, max(DEFAULT_MAX_LENGTH, 2 * self.max_prompt_length))
        if "batch_size" not in given and self.micro_batch_size is not None:
            self.__dict__["micro_batch_size"] = min(self.micro_batch_size, self.batch_size)

    @property
    def tokenizer_source(self) -> str:
        """Where the run's tokenizer is read: the adapter's directory (a checkpoint saves its tokenizer), else
        the model's."""
        return self.adapter or self.model

    @property
    def micro_batch(self) -> int:
        """The micro batch the user asked for (batch_size when unset); a run's plan may choose a smaller one
        (dpo_core.memplan)."""
        return self.micro_batch_size or self.batch_size

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory is None else memory_bytes(self.max_memory)

    def total_steps(self, num_rows: int) -> int:
        """Optimizer steps of a run over `num_rows` training rows (KTO: rows after pairs are split)."""
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(self.num_epochs * steps_per_epoch(num_rows, self.batch_size))


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    """Optimizer steps of one pass over `num_rows` rows: the last step takes what rows are left."""
    return math.ceil(num_rows / batch_size)


def data_problems(spec: TrainingSpec, train_rows: int, train_paired: bool,
                  validation_paired: bool | None = None) -> list[tuple[str, str]]:
    """What the trainer would refuse about the data files, known from their row count and format alone:
    unpaired rows for a paired loss, and a run of more than MAX_STEPS steps. (field, message) pairs."""
    problems = []
    for field, paired in (("train_file", train_paired), ("validation_file", validation_paired)):
        if paired is False and not spec.loss.unpaired:
            problems.append((field, f"holds unpaired rows (prompt/completion/label), which loss {spec.loss.type!r} "
                             "cannot train on; set loss.type: kto, or use a file of pairs"))
    rows = train_rows * 2 if spec.loss.unpaired and train_paired else train_rows  # kto splits each pair
    steps = spec.total_steps(rows)
    if steps > MAX_STEPS:
        problems.append(("num_epochs", f"{spec.num_epochs:g} epochs of {rows} rows at batch_size "
                         f"{spec.batch_size} are {steps:,} steps, above the {MAX_STEPS:,} a run may take; lower "
                         "num_epochs, raise batch_size or set max_steps"))
    return problems


def memory_bytes(value: int | str) -> int:
    """Bytes of a max_memory value: an int, or "40GiB", "900 MiB", "1.5TB" (MEMORY_UNITS); ValueError when it
    is neither or lies outside MIN_MEMORY .. MAX_MEMORY."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", value) if isinstance(value, str) else None
        unit = MEMORY_UNITS.get(found.group(2).lower()) if found else None
        if unit is None:
            raise ValueError(f"{value!r} is not a memory size: give bytes as an int, or a number and a unit, such as "
                             "40GiB, 900MiB or 1.5TB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        size = int(float(found.group(1)) * unit)
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ValueError(f"{value!r} is {size:,} bytes, outside {MEMORY_RANGE.split(':')[0]}")
    return size


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Union members add a location part naming the member ('bool', "literal['auto']", 'list[...]'): no field.
_TAG = re.compile(r"(bool|int|float|str|none|constrained-\w+|function-\w+)|.*\[.*")


def _clean(loc: tuple) -> list[str]:
    parts = [str(p) for p in loc]
    return [p for i, p in enumerate(parts)
            if not (_TAG.fullmatch(p) and (i == 0 or parts[i - 1] != "beta_by_group"))]


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    """(field path, message) per field; a union's members' messages are joined with 'or'."""
    merged: dict[str, list[str]] = {}
    for e in err.errors():
        loc = _clean(e["loc"])
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, CrossFieldError):
            for field, msg in cause.problems:
                merged.setdefault(".".join([*loc, field]), []).append(msg)
            continue
        merged.setdefault(".".join(loc) or "spec", []).append(e["msg"].removeprefix("Value error, "))
    return [(loc, " or ".join(dict.fromkeys(msgs))) for loc, msgs in merged.items()]


def parse_spec(data: dict[str, Any]) -> TrainingSpec:
    """Validate a mapping into a TrainingSpec, raising SpecError that names every problem at once."""
    try:
        return TrainingSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_problems(err)) from None


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads `1e-4` as a number, as YAML 1.2 and JSON do (YAML 1.1 needs `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader


def _parse_value(text: str) -> Any:
    # `--set loss.beta=0.2` and `--set lora=null` should give numbers and None, not strings.
    try:
        return _yaml(text)
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


def read_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML or JSON config file and apply overrides, without validating it (the `dpo` client sends
    it to the service, which validates it)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([("config", f"file not found: {path}")])
    try:
        data = _yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpecError([("config", f"{path} is not valid YAML or JSON: {err}")]) from None
    if not isinstance(data, dict):
        raise SpecError([("config", f"{path} must hold a mapping of settings")])
    return apply_overrides(data, overrides or [])


def load_spec(path: str | Path, overrides: list[str] | None = None) -> TrainingSpec:
    """Read a YAML or JSON config file, apply overrides, validate."""
    return parse_spec(read_config(path, overrides))
