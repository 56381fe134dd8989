"""From an OpenAI-shaped job request to a dpo_core TrainingSpec, and back to a runnable one in the worker.

Precedence: `training` holds any TrainingSpec field; the OpenAI hyperparameters map onto four of them
(beta -> loss.beta, batch_size, n_epochs -> num_epochs, learning_rate_multiplier scales learning_rate).
Setting the same thing in both places with different values is an error, never a silent choice.
What the trainer would refuse and can be known without a model (ranges, the data files' format and
size) is refused here, naming the parameter, so that no such job is ever queued.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from dpo_core.spec import (
    MAX_LEARNING_RATE,
    SERVER_PATH_FIELDS,
    LearningRate,
    SpecError,
    TrainingSpec,
    data_problems,
    parse_spec,
)
from service.errors import InvalidInput
from service.parents import Start
from service.requests import DpoHyperparameters, JobCreate

HP = "method.dpo.hyperparameters"
# OpenAI hyperparameter -> TrainingSpec field path it sets.
HP_FIELDS = {"beta": "loss.beta", "batch_size": "batch_size", "n_epochs": "num_epochs"}
# Spec fields naming the job's files, and the request parameters that set them.
_FILE_PARAMS = {"train_file": "training_file", "validation_file": "validation_file"}
# A job runs on the devices its worker gives it (chosen with gpu_type and gpus): it may ask for the CPU
# (any worker has one), never for a GPU by number, which could be another job's.
SERVICE_DEVICES = (None, "cpu")
_LEARNING_RATE = TypeAdapter(LearningRate)


@dataclass(frozen=True)
class DataFile:
    """What the service knows of an uploaded file without reading it."""

    rows: int
    paired: bool  # not the unpaired (prompt/completion/label) format, see dpo_core.data

    @classmethod
    def of(cls, file) -> DataFile:
        return cls(rows=file.rows, paired=file.format != "unpaired")


@dataclass
class BuiltSpec:
    spec: TrainingSpec
    stored: dict[str, Any]  # the spec without server paths: what the job row keeps
    hyperparameters: dict[str, Any]  # resolved OpenAI hyperparameters


def build(req: JobCreate, train_path: str, validation_path: str | None, output_dir: str,
          train: DataFile | None = None, validation: DataFile | None = None,
          keep_checkpoints: int | None = None, start: Start | None = None) -> BuiltSpec:
    """Validate a job request into a TrainingSpec; raise InvalidInput naming every bad parameter.
    With the files' facts (`train`, `validation`), also what the trainer would refuse about them.
    `keep_checkpoints`: the service's retention, the spec's save_total_limit unless the request sets one
    (null keeps every checkpoint). `start`: where the policy starts when `model` names a checkpoint or a job
    (service.parents); the stored spec keeps that id as its model."""
    training = dict(req.training or {})
    _refuse_server_fields(training)
    hp = _hyperparameters(req)
    data, origin = _merge(training, hp, req)
    if start is not None:
        _start_from(data, start)
    data.update(train_file=train_path, validation_file=validation_path, output_dir=output_dir, resume_from=None)
    if "save_total_limit" not in training:
        data["save_total_limit"] = keep_checkpoints
    try:
        spec = parse_spec(data)
    except SpecError as err:
        _refuse(err.problems, origin)
        raise
    if train is not None:
        _refuse(data_problems(spec, train.rows, train.paired, validation.paired if validation else None), origin)
    resolved = {
        "beta": spec.loss.beta,
        "batch_size": spec.batch_size,
        "n_epochs": spec.num_epochs,
        "learning_rate_multiplier": _number(hp.learning_rate_multiplier) or 1.0,
    }
    return BuiltSpec(spec=spec, stored={**stored_spec(spec), "model": req.model}, hyperparameters=resolved)


def stored_spec(spec: TrainingSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", exclude=set(SERVER_PATH_FIELDS))


def runnable(stored: dict[str, Any], train_path: str, validation_path: str | None, output_dir: str,
             resume_from: str | None = None, start: Start | None = None) -> TrainingSpec:
    """The worker's side: the stored spec plus this machine's paths (where to resume from, and where the
    policy starts when the job continues a checkpoint)."""
    data = {**stored, "train_file": train_path, "validation_file": validation_path, "output_dir": output_dir,
            "resume_from": resume_from}
    if start is not None:
        data.update(model=start.model, adapter=start.adapter)
    return parse_spec(data)


def _start_from(data: dict[str, Any], start: Start) -> None:
    """The policy starts at a checkpoint: its directory, or (LoRA) the base and the adapter to train on."""
    data.update(model=start.model, adapter=start.adapter)
    if start.lora is None:
        return
    if data.get("lora") is not None:
        raise InvalidInput(f"training.lora: checkpoint {start.checkpoint} is a LoRA adapter; the job trains it further "
                           "with its own settings; remove training.lora", param="training.lora")
    data["lora"] = start.lora


def _refuse(problems: list[tuple[str, str]], origin: dict[str, str]) -> None:
    """InvalidInput naming every problem by its request parameter; nothing when there are none."""
    if not problems:
        return
    named = [(origin.get(loc) or _FILE_PARAMS.get(loc) or _training_param(loc), msg) for loc, msg in problems]
    raise InvalidInput("; ".join(f"{p}: {m}" for p, m in named), param=named[0][0],
                       problems=[{"param": p, "message": m} for p, m in named])


def _refuse_server_fields(training: dict[str, Any]) -> None:
    for name in (*SERVER_PATH_FIELDS, "model"):
        if name in training:
            where = {"model": "the top-level model", "adapter": "the service (from the checkpoint id given as model)",
                     "reference_cache": "the service (its team's cache of reference log-probs)"}.get(
                name, "the service (from file ids and the job id)")
            raise InvalidInput(f"training.{name} is set by {where}; remove it from training", param=f"training.{name}")
    if training.get("device") not in SERVICE_DEVICES:
        raise InvalidInput("training.device: a job runs on the GPUs its worker gives it; choose them with gpu_type "
                           "and gpus, and leave training.device null (or cpu, to run on the worker's CPU)",
                           param="training.device")


def _hyperparameters(req: JobCreate) -> DpoHyperparameters:
    in_method = req.method.dpo.hyperparameters if req.method and req.method.dpo else None
    if in_method and req.hyperparameters:
        raise InvalidInput("give hyperparameters in method.dpo.hyperparameters only", param="hyperparameters")
    return in_method or req.hyperparameters or DpoHyperparameters()


def _merge(training: dict[str, Any], hp: DpoHyperparameters, req: JobCreate) -> tuple[dict, dict[str, str]]:
    """Fold hyperparameters, seed and model into the training dict; remember which param set each field."""
    data = {**training, "model": req.model}
    data["loss"] = dict(data["loss"]) if isinstance(data.get("loss"), dict) else data.get("loss", {})  # copy
    origin = {"model": "model"}
    for name, path in HP_FIELDS.items():
        value = _number(getattr(hp, name))
        if value is not None:
            _set_once(data, path, value, f"{HP}.{name}")
            origin[path] = f"{HP}.{name}"
    if req.seed is not None:
        _set_once(data, "seed", req.seed, "seed")
        origin["seed"] = "seed"
    multiplier = _number(hp.learning_rate_multiplier)
    if multiplier is not None:
        base = data.get("learning_rate", TrainingSpec.model_fields["learning_rate"].default)
        if _valid_learning_rate(base):  # otherwise the spec names training.learning_rate
            data["learning_rate"] = _scaled(base, multiplier)
            origin["learning_rate"] = f"{HP}.learning_rate_multiplier"
    return data, origin


def _valid_learning_rate(value: Any) -> bool:
    try:
        _LEARNING_RATE.validate_python(value)
    except ValidationError:
        return False
    return True


def _scaled(base: float, multiplier: float) -> float:
    """The learning rate a multiplier makes, refused unless it is in learning_rate's own range."""
    rate = base * multiplier
    if not _valid_learning_rate(rate):
        raise InvalidInput(
            f"{HP}.learning_rate_multiplier: {multiplier:g} x the learning rate {base:g} is {rate:g}; the learning "
            f"rate must be above 0 and at most {MAX_LEARNING_RATE:g}: lower the multiplier or training.learning_rate",
            param=f"{HP}.learning_rate_multiplier")
    return rate


def _set_once(data: dict[str, Any], path: str, value: Any, param: str) -> None:
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            return  # e.g. training.loss is not a mapping: the spec check reports that
        node = node[part]
    if leaf in node and node[leaf] != value:
        raise InvalidInput(
            f"{param}={value} disagrees with training.{path}={node[leaf]}; set it in one place", param=param
        )
    node[leaf] = value


def _number(value: Any) -> Any:
    return None if value in (None, "auto") else value


def _training_param(loc: str) -> str:
    return "training" if loc == "spec" else f"training.{loc}"
