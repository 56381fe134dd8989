"""`report_to`: a run's metrics also go to TensorBoard, MLflow or Weights & Biases, as callbacks.

Each tracker is an optional package, imported only when a run asks for it; `available()` tells which
this environment has without importing any. Every tracker gets the same names: `train/<metric>` per
logged step and `eval/<metric>` per evaluation (metrics.jsonl's names, without `eval_`), at the
optimizer step they belong to.

- tensorboard: event files in `<output_dir>/tensorboard/` (dpo_core.layout).
- mlflow: the tracking URI and experiment of the environment (MLFLOW_TRACKING_URI,
  MLFLOW_EXPERIMENT_NAME), a run named after the output directory (a service job's id), the spec as
  params.
- wandb: W&B's own environment (WANDB_API_KEY, WANDB_PROJECT, WANDB_MODE=offline ...), a run named
  after the output directory, the spec as its config; its files in WANDB_DIR, or the output directory.

A resumed run goes on in the same MLflow or W&B run (their ids are kept in `<output_dir>/tracking.json`),
and TensorBoard drops what a crashed run logged after the checkpoint it resumes from. A tracker that
fails while the run trains (a tracking server gone) is reported once as a warning and left out from
then on: it never stops training.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_core.callbacks import Callbacks
from dpo_core.errors import TrainingError
from dpo_core.layout import TENSORBOARD_DIR, TRACKING_FILE
from dpo_core.spec import REPORT_TO, SERVER_PATH_FIELDS, TrainingSpec

log = logging.getLogger("dpo_core.reporting")
TRACKING_EXTRA = "pip install 'dpo-service[tracking]'"  # all three at once


@dataclass(frozen=True)
class Tracker:
    module: str  # what `import` needs
    package: str  # what pip installs


TRACKERS = {"tensorboard": Tracker("tensorboard", "tensorboard"), "mlflow": Tracker("mlflow", "mlflow-skinny"),
            "wandb": Tracker("wandb", "wandb")}
assert tuple(TRACKERS) == REPORT_TO  # the spec's choices and these must agree


def available() -> list[str]:
    """The trackers whose package this environment can import (found without importing it)."""
    return [name for name, t in TRACKERS.items() if importlib.util.find_spec(t.module) is not None]


def install_hint(name: str) -> str:
    return f"pip install {TRACKERS[name].package}, or {TRACKING_EXTRA} for every tracker"


def unavailable_message(name: str, where: str) -> str:
    """What a user reads when `name` cannot be imported `where` (e.g. "where this run trains")."""
    return f"report_to: {name} is not installed {where}; install it there ({install_hint(name)}), or remove " \
           f"{name} from report_to"


def _import(name: str):
    try:
        return importlib.import_module(TRACKERS[name].module)
    except ImportError:
        raise TrainingError(unavailable_message(name, "where this run trains"), code="report_to_unavailable") \
            from None


def with_reporters(spec: TrainingSpec, callbacks: Callbacks) -> Callbacks:
    """`callbacks`, also reporting to every tracker of spec.report_to. Imports each tracker now, so a
    missing package fails the run before anything loads (TrainingError `report_to_unavailable`)."""
    if not spec.report_to:
        return callbacks
    made = {"tensorboard": TensorBoardReporter, "mlflow": MlflowReporter, "wandb": WandbReporter}
    return Reporting(callbacks, [made[name](spec) for name in spec.report_to])


class Reporting(Callbacks):
    """The caller's callbacks first, then each reporter; a reporter that raises is warned about once and
    dropped. Stopping is the caller's alone to decide."""

    def __init__(self, inner: Callbacks, reporters: list[Reporter]):
        self.inner, self.reporters = inner, reporters

    def _each(self, hook: str, *args) -> None:
        for reporter in list(self.reporters):
            try:
                getattr(reporter, hook)(*args)
            except Exception as err:  # noqa: BLE001 - a tracker's failure must not end the training
                self.reporters.remove(reporter)
                log.warning("report_to %s failed; the run goes on without it", reporter.name, exc_info=err)
                # Only the error's kind: its text may hold a tracking URI with its credentials, and a
                # service job shows its warnings to its team. The log has the rest.
                self.inner.on_warning(f"report_to: {reporter.name} failed ({type(err).__name__}); the run goes "
                                      "on without it (the trainer's log has the details)")

    def on_start(self, info):
        self.inner.on_start(info)
        self._each("on_start", info)

    def on_step(self, step, total_steps):
        self.inner.on_step(step, total_steps)

    def on_log(self, metrics):
        self.inner.on_log(metrics)
        self._each("on_log", metrics)

    def on_eval(self, metrics):
        self.inner.on_eval(metrics)
        self._each("on_eval", metrics)

    def on_samples(self, step, records, summary):
        self.inner.on_samples(step, records, summary)

    def on_checkpoint(self, step, path):
        self.inner.on_checkpoint(step, path)

    def on_warning(self, message, *, code=None, data=None):
        self.inner.on_warning(message, code=code, data=data)

    def on_end(self, result):
        self._each("on_end", result)  # the trackers' files are complete before the caller records the end
        self.inner.on_end(result)

    def on_error(self, error):
        self._each("on_error", error)  # each tracker's run ends failed, not left open
        self.inner.on_error(error)

    def should_stop(self):
        return self.inner.should_stop()

    def checkpoint_on_stop(self):
        return self.inner.checkpoint_on_stop()


# ---------------------------------------------------------------- what every tracker gets


def scalars(record: dict[str, Any], evaluation: bool) -> dict[str, float]:
    """A metrics record as tracker names: `train/loss`, `eval/loss` (numbers only; no step counters)."""
    prefix = "eval/" if evaluation else "train/"
    out = {}
    for key, value in record.items():
        if key in ("step", "total_steps") or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[prefix + (key.removeprefix("eval_") if evaluation else key)] = float(value)
    return out


def params(spec: TrainingSpec) -> dict[str, str]:
    """The spec, flattened (`loss.beta`), with file names instead of this machine's paths."""
    data = spec.model_dump(mode="json")
    for name in SERVER_PATH_FIELDS:
        data[name] = Path(data[name]).name if name in ("train_file", "validation_file") and data[name] else None
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix.rstrip(".")] = json.dumps(node) if isinstance(node, list | dict) else str(node)
    walk(data, "")
    return flat


def run_name(spec: TrainingSpec) -> str:
    """The output directory's name: a service job's id."""
    return Path(spec.output_dir).resolve().name


class _Ids:
    """The tracker run ids of this output directory (TRACKING_FILE), so a resumed run goes on in its run."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / TRACKING_FILE

    def get(self, name: str) -> str | None:
        try:
            return json.loads(self.path.read_text()).get(name)
        except (OSError, ValueError):
            return None

    def put(self, name: str, run_id: str) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({**data, name: run_id}))


class Reporter(Callbacks):
    name = ""

    def __init__(self, spec: TrainingSpec):
        self.spec = spec
        self.module = _import(self.name)

    @staticmethod
    def resumed(info: dict[str, Any]) -> int | None:
        return info.get("resumed_from_step")


class TensorBoardReporter(Reporter):
    name = "tensorboard"

    def __init__(self, spec: TrainingSpec):
        super().__init__(spec)
        self.writer = None

    def on_start(self, info):
        from torch.utils.tensorboard import SummaryWriter

        resumed = self.resumed(info)
        # purge_step: TensorBoard's reader drops what a crashed run logged after the checkpoint resumed from.
        self.writer = SummaryWriter(str(Path(self.spec.output_dir) / TENSORBOARD_DIR), flush_secs=10,
                                    purge_step=resumed + 1 if resumed else None)

    def _write(self, record: dict[str, Any], evaluation: bool) -> None:
        for tag, value in scalars(record, evaluation).items():
            self.writer.add_scalar(tag, value, global_step=record.get("step", 0))

    def on_log(self, metrics):
        self._write(metrics, False)

    def on_eval(self, metrics):
        self._write(metrics, True)

    def on_end(self, result):
        self.writer.close()

    def on_error(self, error):
        if self.writer is not None:
            self.writer.close()


class MlflowReporter(Reporter):
    name = "mlflow"

    def __init__(self, spec: TrainingSpec):
        super().__init__(spec)
        self.client = self.run_id = None

    def on_start(self, info):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, or MLflow's default (./mlruns)
        ids = _Ids(self.spec.output_dir)
        self.run_id = ids.get(self.name) if self.resumed(info) else None
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment, run_name=run_name(self.spec)).info.run_id
        ids.put(self.name, self.run_id)
        values = [Param(k, v) for k, v in params(self.spec).items()]
        for i in range(0, len(values), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=values[i:i + 100])

    def _write(self, record: dict[str, Any], evaluation: bool) -> None:
        from mlflow.entities import Metric

        at, step = int(time.time() * 1000), int(record.get("step", 0))
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, at, step)
                                                    for k, v in scalars(record, evaluation).items()])

    def on_log(self, metrics):
        self._write(metrics, False)

    def on_eval(self, metrics):
        self._write(metrics, True)

    def on_end(self, result):
        self.client.set_terminated(self.run_id, status="KILLED" if result.stopped else "FINISHED")

    def on_error(self, error):
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED")


class WandbReporter(Reporter):
    name = "wandb"

    def __init__(self, spec: TrainingSpec):
        super().__init__(spec)
        self.run = None

    def on_start(self, info):
        ids = _Ids(self.spec.output_dir)
        run_id = ids.get(self.name) if self.resumed(info) else None
        self.run = self.module.init(
            project=os.environ.get("WANDB_PROJECT") or "dpo", name=run_name(self.spec), config=params(self.spec),
            dir=None if os.environ.get("WANDB_DIR") else self.spec.output_dir, id=run_id,
            resume="allow" if run_id else None, reinit="create_new")
        ids.put(self.name, self.run.id)

    def on_log(self, metrics):
        self.run.log(scalars(metrics, False), step=int(metrics.get("step", 0)))

    def on_eval(self, metrics):
        self.run.log(scalars(metrics, True), step=int(metrics.get("step", 0)))

    def on_end(self, result):
        self.run.finish(exit_code=1 if result.stopped else 0)

    def on_error(self, error):
        if self.run is not None:
            self.run.finish(exit_code=1)
