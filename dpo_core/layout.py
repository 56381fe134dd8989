"""Where a run's files lie in its output directory: defined once, for the trainer that writes them
(dpo_core.checkpoint, dpo_core.trainer, dpo_core.metrics) and for the worker that finds them there.
Torch-free, so that reading the layout never loads the trainer's stack.

    output_dir/
      checkpoint-<step>/   a complete checkpoint: the model (or LoRA adapter), its tokenizer,
                           trainer_state.pt, and state.json, written last: its presence marks it complete
      final/               the final model, which `from_pretrained` loads
      metrics.jsonl        one JSON object per logged step or evaluation
      tensorboard/         TensorBoard event files (report_to: tensorboard)
      tensorboard.tar      the service's worker packs tensorboard/ into it when a job succeeds (a result file)
      tracking.json        the MLflow and W&B run ids of the run (report_to), so a resumed run goes on in them
      .<name>.tmp-<pid>    a directory being written; renamed to <name> once complete
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

STATE_FILE = "state.json"
TRAINER_FILE = "trainer_state.pt"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_TAR = "tensorboard.tar"
TRACKING_FILE = "tracking.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TMP = ".tmp-"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def temporary_dir(target: Path) -> Path:
    """The name this process writes `target` under before renaming it into place."""
    return target.with_name(f".{target.name}{_TMP}{os.getpid()}")


def remove_partial(output_dir: str | Path) -> None:
    """Delete the directories a run was writing when it died (never resumed from: only a renamed, complete
    checkpoint is). Only for an output directory no live run writes to."""
    root = Path(output_dir)
    if root.is_dir():
        for tmp in root.glob(f".*{_TMP}*"):
            shutil.rmtree(tmp, ignore_errors=True)
