"""A run that diverges stops at that step with training_diverged and writes no non-finite model;
fp16's own overflows (skipped by the GradScaler) are not divergence."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_core import Callbacks, parse_spec, train
from dpo_core.errors import TrainingDiverged
from tests.diverging import SPEC, poisoned_model, poisoned_rows

POISONED_STEP = 5


@pytest.fixture(scope="module")
def poisoned(tiny_model, tmp_path_factory) -> str:
    return poisoned_model(tiny_model, tmp_path_factory.mktemp("poisoned") / "model")


def _spec(model, train_file, out, **extra):
    base = dict(model=model, train_file=str(train_file), output_dir=str(out), learning_rate=1e-3, batch_size=8,
                micro_batch_size=4, max_steps=10, logging_steps=1, max_length=64, max_prompt_length=32)
    return parse_spec({**base, **extra})


def _finite(directory: Path) -> bool:
    tensors = [t for f in directory.glob("*.safetensors") for t in load_file(f).values()]
    assert tensors, f"no weights in {directory}"
    return all(torch.isfinite(t).all() for t in tensors)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class _Seen(Callbacks):
    def __init__(self):
        self.steps, self.checkpoints = [], []

    def on_step(self, step, total_steps):
        self.steps.append(step)

    def on_checkpoint(self, step, path):
        self.checkpoints.append(step)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}], ids=["full", "lora"])
def test_a_non_finite_loss_stops_the_run_at_that_step_and_keeps_the_earlier_checkpoints(
        poisoned, synthetic, tmp_path, lora):
    """The rigged model (tests/diverging.py) gives a NaN loss at step 5 exactly, with valid hyperparameters."""
    data = poisoned_rows(synthetic[0], tmp_path / "train.jsonl", POISONED_STEP, batch_size=8, seed=42)
    seen = _Seen()
    with pytest.raises(TrainingDiverged) as caught:
        train(_spec(poisoned, data, tmp_path / "out", save_steps=2, lora=lora, **SPEC), seen)
    assert caught.value.code == "training_diverged"
    assert f"at step {POISONED_STEP}: the loss is nan" in str(caught.value)
    assert seen.steps == [1, 2, 3, 4] and seen.checkpoints == [2, 4]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "checkpoint-2", "checkpoint-4", "metrics.jsonl"]
    assert _finite(out / "checkpoint-2") and _finite(out / "checkpoint-4")
    losses = [r["loss"] for r in _records(out)]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("save_steps", [1, None], ids=["checkpoint", "final"])
def test_weights_that_became_non_finite_are_never_written(tiny_model, synthetic, tmp_path, save_steps):
    """A learning rate past float32's range makes step 2's update non-finite, while step 2's loss and
    gradients (computed before the update) are finite. The spec refuses such a learning rate; the test
    goes around that check (model_copy does not validate) to reach the trainer's own, which must hold
    whatever put the weights there. Warm-up makes step 1's learning rate 0, so checkpoint-1 is finite."""
    spec = _spec(tiny_model, synthetic[0], tmp_path, max_steps=2, warmup_steps=2, lr_scheduler="constant",
                 save_steps=save_steps).model_copy(update={"learning_rate": 1e200})
    with pytest.raises(TrainingDiverged) as caught:
        train(spec)
    assert "at step 2: the weights after it are not finite" in str(caught.value)
    written = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("checkpoint-", "final")))
    assert written == (["checkpoint-1"] if save_steps else [])
    if save_steps:
        assert _finite(tmp_path / "checkpoint-1")


def test_fp16_overflows_that_the_grad_scaler_skips_are_not_divergence(tiny_model, synthetic, tmp_path):
    """A scale of 2**40 overflows fp16's gradients at first: the scaler skips those steps and halves the
    scale each time, and the run goes on to a finite final model."""
    from dpo_core import trainer

    run, _ = trainer.setup(_spec(tiny_model, synthetic[0], tmp_path, max_steps=30, precision="fp16"))
    run.scaler = torch.amp.GradScaler(run.device.type, init_scale=2.0**40)
    trainer._loop(run)
    assert run.progress.step == 30 and run.scaler.get_scale() < 2.0**30  # some steps overflowed
    final = Path(trainer._save_final(run))
    assert _finite(final)
