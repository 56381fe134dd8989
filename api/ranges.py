"""The table of ranges of a job request, rendered from the schemas (docs/api.md holds a copy that a test
compares with this). `python -m api.ranges` prints it."""
from __future__ import annotations

import dataclasses

from dpo_core.fields import FieldRange, default_text, field_ranges, range_text
from dpo_core.spec import SERVER_PATH_FIELDS, TrainingSpec
from service.jobspec import HP_FIELDS, SERVICE_DEVICES
from service.requests import DpoHyperparameters, JobCreate

BEGIN, END = "<!-- ranges:begin (python -m api.ranges) -->", "<!-- ranges:end -->"
_JOB_FIELDS = ("seed", "priority", "gpus", "max_attempts")
# Where the service sets a default of its own (service.jobspec.build) instead of TrainingSpec's.
_SERVICE_DEFAULTS = {"save_total_limit": "DPO_KEEP_CHECKPOINTS (3)"}
_KINDS = {"int": "int", "float": "number", "bool": "bool", "string": "string", "object": "object", "map": "object",
          "list": "list"}


def request_ranges() -> list[tuple[str, FieldRange, str, str]]:
    """(parameter, its FieldRange, default, range) for every number and choice a job request takes."""
    spec = {f.path: f for f in field_ranges(TrainingSpec)}
    rows = [(f.path, f, default_text(f), range_text(f)) for f in field_ranges(JobCreate) if f.path in _JOB_FIELDS]
    for f in field_ranges(DpoHyperparameters):
        target = spec.get(HP_FIELDS.get(f.path, ""))
        default = f"auto: {default_text(target)}" if target else "auto: 1"
        rows.append((f"method.dpo.hyperparameters.{f.path}", f, default, range_text(f)))
    for f in field_ranges(TrainingSpec):
        if f.path in (*SERVER_PATH_FIELDS, "model"):
            continue
        if f.path == "device":  # what a service job may ask, see service.jobspec
            allowed = tuple(d for d in SERVICE_DEVICES if d is not None)
            f = dataclasses.replace(f, range_text=", ".join(allowed), examples=allowed, meaning="null: the GPUs "
                                    "the worker gives the job (gpu_type, gpus); cpu: the worker's CPU")
        default = _SERVICE_DEFAULTS.get(f.path) or default_text(f)
        rows.append((f"training.{f.path}", f, default, range_text(f)))
    return rows


def table() -> str:
    lines = ["| parameter | type | default | range | meaning |", "|---|---|---|---|---|"]
    for param, f, default, shown in request_ranges():
        cells = (f"`{param}`", _kind(f), default, shown, f.meaning)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _kind(f: FieldRange) -> str:
    if f.kind != "choice":
        return _KINDS[f.kind]
    return "string" if all(isinstance(c, str) for c in f.choices) else "bool or string"


if __name__ == "__main__":
    print(table())
