"""dpo_core under torch.distributed on CPU (gloo): 2 ranks train like 1, resume across world sizes,
and a dead rank ends the run without leaving processes behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from dpo_core import parse_spec, train
from dpo_core.launch import launch

pytestmark = pytest.mark.slow


def _spec(tiny_model, synthetic, out, **extra):
    train_file, held_out = synthetic
    base = dict(model=tiny_model, train_file=train_file, validation_file=held_out, output_dir=str(out),
                learning_rate=1e-3, lr_scheduler="constant", batch_size=8, micro_batch_size=2, max_steps=6, logging_steps=1,
                max_length=64, max_prompt_length=32, device="cpu")
    return parse_spec({**base, **extra})


def _losses(out) -> list[float]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.fixture(scope="module")
def one_rank(tiny_model, synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-rank")
    result = train(_spec(tiny_model, synthetic, out, save_steps=3, share_prompt=False))
    return out, result


@pytest.mark.parametrize("mode, layout", [("ddp", {}), ("ddp", {"packing": True}), ("fsdp", {}),
                                          ("fsdp", {"share_prompt": True})],
                         ids=["ddp", "ddp-packed", "fsdp", "fsdp-shared-prompt"])
def test_two_ranks_follow_the_one_rank_loss_curve(tiny_model, synthetic, tmp_path, one_rank, mode, layout):
    from transformers import AutoModelForCausalLM

    result = launch(_spec(tiny_model, synthetic, tmp_path, distributed=mode, **{"share_prompt": False, **layout}),
                    nproc=2)
    single_out, single = one_rank
    assert result.global_step == 6
    assert _losses(tmp_path) == pytest.approx(_losses(single_out), rel=1e-5)
    assert result.eval_metrics["eval_loss"] == pytest.approx(single.eval_metrics["eval_loss"], rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(single.final_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(result.final_dir).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_a_two_rank_fsdp_checkpoint_resumes_on_one_rank(tiny_model, synthetic, tmp_path, one_rank):
    # A constant learning rate, so stopping the first run at step 3 changes nothing before the resume.
    spec = _spec(tiny_model, synthetic, tmp_path, distributed="fsdp", max_steps=3, save_steps=3, validation_file=None)
    launch(spec, nproc=2)
    resumed = train(_spec(tiny_model, synthetic, tmp_path, resume_from="auto", validation_file=None))
    assert resumed.global_step == 6
    assert _losses(tmp_path) == pytest.approx(_losses(one_rank[0]), rel=1e-5)


def test_a_killed_rank_fails_the_run_and_leaves_no_processes(tiny_model, synthetic, tmp_path):
    cfg = _spec(tiny_model, synthetic, tmp_path / "out", max_steps=100000, validation_file=None).model_dump()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "dpo_core.cli", str(tmp_path / "cfg.yaml"), "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent = psutil.Process(proc.pid)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
        time.sleep(0.5)
    ranks = [p for p in parent.children(recursive=True) if "spawn" in " ".join(p.cmdline())]
    assert len(ranks) >= 2, [p.cmdline() for p in parent.children(recursive=True)]
    everything = parent.children(recursive=True)
    os.kill(ranks[-1].pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output
    assert "distributed training failed" in output
    gone, alive = psutil.wait_procs(everything, timeout=30)
    assert not alive, f"orphans: {[p.pid for p in alive]}"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_divergence_on_one_rank_stops_every_rank_at_that_step(tiny_model, synthetic, tmp_path, mode):
    """Only rank 1's rows of step 3 hold the poison of tests/diverging.py (a NaN loss there, with valid
    hyperparameters); rank 0's loss is finite. Both ranks stop at step 3 and the run fails as diverged,
    not as a failed rank, with the checkpoints of steps 1 and 2 written and nothing after them."""
    from dpo_core.errors import TrainingDiverged
    from tests.diverging import SPEC, poisoned_model, poisoned_rows

    model = poisoned_model(tiny_model, tmp_path / "model")
    data = poisoned_rows(synthetic[0], tmp_path / "train.jsonl", 3, batch_size=8, seed=42, within=slice(1, None, 2))
    spec = _spec(tiny_model, synthetic, tmp_path / "out", model=model, train_file=str(data), validation_file=None,
                 distributed=mode, save_steps=1, **SPEC)
    with pytest.raises(TrainingDiverged, match="at step 3: the loss is nan"):
        launch(spec, nproc=2)
    assert sorted(p.name for p in (tmp_path / "out").glob("[cf]*")) == ["checkpoint-1", "checkpoint-2"]
