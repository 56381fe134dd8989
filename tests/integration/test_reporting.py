"""report_to: a tiny training run's metrics, read back with each tracker's own reader (TensorBoard's
event accumulator, an MLflow client on a local file store, W&B's offline run file)."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from dpo_core import Callbacks, parse_spec, train
from dpo_core.errors import TrainingError
from dpo_core.layout import TENSORBOARD_DIR

STEPS, EVERY = 4, 2


def _spec(tiny_model, synthetic, out, **overrides):
    train_file, held_out = synthetic
    base = dict(model=tiny_model, train_file=train_file, validation_file=held_out, output_dir=str(out),
                learning_rate=1e-3, batch_size=4, max_steps=STEPS, logging_steps=EVERY, eval_steps=EVERY,
                max_length=64, max_prompt_length=32)
    return parse_spec({**base, **overrides})


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_and_mlflow_get_every_logged_step_and_evaluation(tiny_model, synthetic, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dpo-tests")
    out = tmp_path / "ftjob-reported"
    train(_spec(tiny_model, synthetic, out, report_to=["tensorboard", "mlflow"]))
    logged = [r for r in _records(out) if "loss" in r]
    evals = [r for r in _records(out) if "eval_loss" in r]
    assert [r["step"] for r in logged] == [2, 4] and [r["step"] for r in evals] == [2, 4]

    events = EventAccumulator(str(out / TENSORBOARD_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/rewards/accuracies", "train/learning_rate", "train/step_time_s", "eval/loss",
            "eval/rewards/accuracies"} <= tags
    assert "train/step" not in tags and "eval/step" not in tags
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in logged])
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("dpo-tests")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "ftjob-reported" and run.info.status == "FINISHED"
    assert run.data.params["loss.beta"] == "0.1" and run.data.params["train_file"] == Path(synthetic[0]).name
    assert run.data.params["output_dir"] == "None"  # this machine's paths stay out of the tracker
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in logged]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/rewards/accuracies")] == [2, 4]

    class Fails(Callbacks):
        def on_log(self, metrics):
            raise RuntimeError("the caller's own failure")

    with pytest.raises(RuntimeError):
        train(_spec(tiny_model, synthetic, tmp_path / "ftjob-failed", report_to=["mlflow"]), Fails())
    failed = client.search_runs([experiment.experiment_id], "attributes.run_name = 'ftjob-failed'")
    assert [r.info.status for r in failed] == ["FAILED"]  # ended, not left running


def test_wandb_offline_writes_a_run_with_the_logged_history(tiny_model, synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "ftjob-wandb"
    train(_spec(tiny_model, synthetic, out, report_to=["wandb"], validation_file=None, eval_steps=None))
    logged = [r for r in _records(out) if "loss" in r]
    [run_file] = (tmp_path / "wandb-dir").glob("wandb/offline-run-*/run-*.wandb")
    records = _finished(run_file)
    assert [r.run.display_name for r in records if r.WhichOneof("record_type") == "run"] == ["ftjob-wandb"]
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    rows = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in rows] == [r["step"] for r in logged]
    assert [h["train/loss"] for h in rows] == pytest.approx([r["loss"] for r in logged])


def _finished(path: Path, timeout_s: float = 60) -> list:
    """The records of a W&B run file once it holds the run's exit record: W&B's own service process
    writes the file, and may still be at it when finish() has returned."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout_s
    while True:
        records = []
        for data in _wandb_records(path):
            records.append(wandb_internal_pb2.Record())
            records[-1].ParseFromString(data)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _wandb_records(path: Path):
    """The records of a W&B run file: a 7-byte header, then LevelDB's log format (32 KiB blocks of
    chunks: CRC32, length, type 1 full | 2 first | 3 middle | 4 last)."""
    data, pos, block, partial = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if pos + 7 + length > len(data):
            return  # a chunk still being written
        partial += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield partial
            partial = b""


def test_a_tracker_that_is_not_installed_fails_the_run_before_it_loads_anything(tiny_model, synthetic, tmp_path,
                                                                                 monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` does where it is not installed
    with pytest.raises(TrainingError) as err:
        train(_spec(tiny_model, synthetic, tmp_path / "out", report_to=["wandb"]))
    assert err.value.code == "report_to_unavailable"
    assert "pip install wandb" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_dpo_train_takes_report_to_on_the_command_line(tiny_model, synthetic, tmp_path, capsys):
    import yaml

    from dpo_core.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": tiny_model, "train_file": synthetic[0], "output_dir": str(tmp_path / "out"),
                                      "max_steps": 2, "batch_size": 4, "logging_steps": 1, "max_length": 64}))
    assert main([str(config), "--report-to", "tensorboard,comet"]) == 2
    assert "report_to" in capsys.readouterr().err
    assert main([str(config), "--report-to", "tensorboard"]) == 0
    assert list((tmp_path / "out" / TENSORBOARD_DIR).glob("events.out.tfevents.*"))


def test_a_tracker_that_fails_while_the_run_trains_is_warned_about_once_and_left_out(tiny_model, synthetic,
                                                                                    tmp_path):
    class Warnings(Callbacks):
        def __init__(self):
            self.seen = []

        def on_warning(self, message):
            self.seen.append(message)

    out = tmp_path / "out"
    out.mkdir()
    (out / TENSORBOARD_DIR).write_text("a file where TensorBoard's directory goes")
    warnings = Warnings()
    result = train(_spec(tiny_model, synthetic, out, report_to=["tensorboard"], validation_file=None,
                         eval_steps=None), warnings)
    assert result.global_step == STEPS and result.final_dir is not None
    failed = [w for w in warnings.seen if w.startswith("report_to: tensorboard failed")]
    assert len(failed) == 1, warnings.seen


def test_a_resumed_run_goes_on_in_the_same_tracker_runs(tiny_model, synthetic, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "ftjob-resumed"
    common = dict(report_to=["tensorboard", "mlflow"], validation_file=None, eval_steps=None, logging_steps=1,
                  save_steps=2)
    train(_spec(tiny_model, synthetic, out, max_steps=2, **common))
    train(_spec(tiny_model, synthetic, out, max_steps=4, resume_from="auto", **common))

    events = EventAccumulator(str(out / TENSORBOARD_DIR))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    client = MlflowClient(store)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "ftjob-resumed" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
