"""Checkpoints: written atomically, found again for `resume_from: auto`, pruned to a limit.

A checkpoint directory (its name and files: dpo_core.layout) holds the model (or LoRA adapter) and
tokenizer, `trainer_state.pt` (optimizer, scheduler, RNG) and `state.json` (step, data position,
counters). It is written under a temporary name and renamed into place only when complete, so a crash
mid-write never leaves something a resume would pick up. It holds only regular files and directories:
a symbolic link (or a pipe, a device) that the model's own save code left in it fails the write, so no
checkpoint, and no download of one, ever leads to a file outside it.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import stat
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dpo_core.errors import CheckpointError
from dpo_core.layout import STATE_FILE, TRAINER_FILE, checkpoint_dir, list_checkpoints, temporary_dir


@dataclass
class Progress:
    """Where a run stands; everything resume needs besides weights, optimizer and RNG."""

    step: int = 0
    epoch: int = 0  # current epoch index
    batch_in_epoch: int = 0  # optimizer steps already taken in that epoch
    num_tokens: int = 0
    elapsed_s: float = 0.0


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_dir(target: Path, write) -> None:
    tmp = temporary_dir(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if odd := _not_plain(tmp):
            raise CheckpointError(f"could not write {target}: the model's save wrote {odd}, which is not a regular "
                                  "file or directory (a symbolic link?); a checkpoint holds only plain files")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)  # removes links themselves, never what they point to
        raise
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {target}: {err.strerror or err}") from err


def _not_plain(root: Path) -> str | None:
    """The first entry under `root` (relative to it) that is not a regular file or a directory."""
    for directory, dirs, files in os.walk(root):  # never follows a link: one to a directory is in `dirs`
        for name in sorted(dirs + files):
            path = Path(directory) / name
            mode = path.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                return path.relative_to(root).as_posix()
    return None


def _save_model(model, path: Path, state_dict: dict | None) -> None:
    # `state_dict` carries the gathered weights when the live ones are sharded (FSDP).
    if state_dict is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, state_dict=state_dict)


def save_checkpoint(output_dir: str, model, tokenizer, optimizer_state: dict, scheduler, progress: Progress,
                    model_state: dict | None = None) -> str:
    """Write checkpoint-<step>/ atomically. `optimizer_state` is keyed by parameter name, so it loads
    into any world size (dpo_core.distributed.optimizer_state)."""
    target = checkpoint_dir(output_dir, progress.step)

    def write(tmp: Path) -> None:
        _save_model(model, tmp, model_state)
        tokenizer.save_pretrained(tmp)
        torch.save(
            {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_state()},
            tmp / TRAINER_FILE,
        )
        # Written last: its presence marks a complete checkpoint.
        (tmp / STATE_FILE).write_text(json.dumps(asdict(progress)))

    atomic_dir(target, write)
    return str(target)


def save_model_dir(target: str | Path, model, tokenizer, model_state: dict | None = None) -> str:
    """Save a model directory that `from_pretrained` loads, atomically."""
    target = Path(target)
    atomic_dir(target, lambda tmp: (_save_model(model, tmp, model_state), tokenizer.save_pretrained(tmp)))
    return str(target)


def resolve_resume(resume_from: str | None, output_dir: str) -> str | None:
    """The checkpoint directory to resume from: explicit, 'auto' (latest, if any), or None."""
    if resume_from is None:
        return None
    if resume_from == "auto":
        found = list_checkpoints(output_dir)
        return str(found[-1][1]) if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"resume_from {resume_from!r} is not a complete checkpoint directory (no {STATE_FILE})")
    return str(path)


def load_progress(checkpoint_dir: str) -> tuple[Progress, dict]:
    path = Path(checkpoint_dir)
    progress = Progress(**json.loads((path / STATE_FILE).read_text()))
    trainer_state = torch.load(path / TRAINER_FILE, weights_only=False)
    return progress, trainer_state


def prune(output_dir: str, keep: int | None, also: Collection[int] = ()) -> list[int]:
    """Delete the checkpoints older than the latest `keep`, except those of the steps in `also` (the
    best by eval, say); returns the steps deleted. `keep` None or 0 keeps every checkpoint."""
    if not keep:
        return []
    gone = [(step, path) for step, path in list_checkpoints(output_dir)[:-keep] if step not in also]
    for _, path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return [step for step, _ in gone]


def best_by_eval(steps: Iterable[int], values: dict[int, float], mode: str = "min") -> int | None:
    """The step among `steps` whose evaluation at that very step gave the best finite value (the lowest
    for mode min, the highest for max; the latest such step on a tie); None when no step in `steps` was
    evaluated."""
    sign = 1 if mode == "min" else -1
    scored = [(sign * values[s], -s) for s in steps if s in values and math.isfinite(values[s])]
    return -min(scored)[1] if scored else None


def copy_model_dir(checkpoint: str | Path, target: str | Path) -> str:
    """A checkpoint's model and tokenizer as a model directory of its own, atomically: what
    `from_pretrained` loads, without the trainer's state (the best checkpoint made the final model)."""
    source, target = Path(checkpoint), Path(target)

    def trainer_files(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if Path(directory) == source and n in (STATE_FILE, TRAINER_FILE)]

    atomic_dir(target, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=trainer_files))
    return str(target)
