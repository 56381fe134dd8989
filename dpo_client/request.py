"""The body of POST /v1/fine_tuning/jobs from `dpo jobs create`: its options, plus a `dpo-train` config.

A config is the YAML (or JSON) that `dpo-train` takes, read by the same reader (dpo_core.spec), with
`--set key=value` overrides applied the same way. Its `model`, `train_file` and `validation_file` stand in
for --model, --train and --validation; the paths the service sets itself (`output_dir`, `resume_from`)
are left out; every other key is a TrainingSpec field and goes into the request's `training` object,
where the service validates it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_client.errors import ClientError

FILE_KEYS = ("model", "train_file", "validation_file")
SERVICE_PATHS = ("output_dir", "resume_from")  # where the service keeps a job's outputs, its own choice


def read_config(path: Path | None, overrides: list[str]) -> dict[str, Any]:
    """The config at `path` (None: an empty one) with `overrides` applied."""
    if path is None and not overrides:
        return {}
    from dpo_core.spec import SpecError, apply_overrides  # torch-free
    from dpo_core.spec import read_config as read

    try:
        return read(path, overrides) if path is not None else apply_overrides({}, overrides)
    except SpecError as err:
        raise ClientError("; ".join(f"{loc}: {msg}" for loc, msg in err.problems), "invalid_config") from None


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(the config's model and files, its `training` fields, the keys left out)."""
    training = dict(config)
    files = {k: training.pop(k) for k in FILE_KEYS if k in training}
    dropped = [k for k in SERVICE_PATHS if training.pop(k, None) is not None]
    for key, value in files.items():
        if value is not None and not isinstance(value, str):
            raise ClientError(f"{key} in the config must be a string, not {value!r}", "invalid_config")
    return files, training, dropped


def model_name(model: str) -> str:
    """A hub id as it is; a local model directory (one holding config.json) as its absolute path, which the
    service accepts when it lies under its DPO_MODEL_DIRS."""
    path = Path(model).expanduser()
    if not model.startswith("/") and (path / "config.json").is_file():
        return str(path.resolve())
    return model


def job_body(model: str, training_file: str, validation_file: str | None, training: dict[str, Any],
             suffix: str | None, priority: int | None, gpu_type: str | None, gpus: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "training_file": training_file}
    optional = {"validation_file": validation_file, "training": training or None, "suffix": suffix,
                "priority": priority, "gpu_type": gpu_type, "gpus": gpus}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body
