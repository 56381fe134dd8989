"""dpo_core.layout: the output directory's layout, one definition for the trainer and the worker. What a run
was writing when it died (atomic_dir's temporary name) is what remove_partial removes, and only that; the
layout loads without torch, so the worker's main process and the service core can use it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_core import layout
from dpo_core.checkpoint import atomic_dir


def _dies(tmp):
    """A write whose process is killed midway: atomic_dir gets no chance to clean up after it."""
    (tmp / "model.safetensors").write_bytes(b"half a model")
    raise KeyboardInterrupt


@pytest.mark.parametrize("target", ["checkpoint-8", layout.FINAL_DIR])
def test_remove_partial_removes_what_a_dead_run_was_writing_and_only_that(tmp_path, target):
    done = layout.checkpoint_dir(tmp_path, 4)
    atomic_dir(done, lambda tmp: (tmp / layout.STATE_FILE).write_text("{}"))
    (tmp_path / layout.METRICS_FILE).write_text('{"step": 4}\n')
    with pytest.raises(KeyboardInterrupt):
        atomic_dir(tmp_path / target, _dies)
    partial = [p for p in tmp_path.iterdir() if p.name not in ("checkpoint-4", layout.METRICS_FILE)]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    assert layout.list_checkpoints(tmp_path) == [(4, done)]

    layout.remove_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", layout.METRICS_FILE]
    layout.remove_partial(tmp_path / "absent")  # a job's first run: no output directory yet


def test_the_layout_loads_without_torch():
    code = "import json, sys, dpo_core.layout; print(json.dumps(sorted(m for m in sys.modules if m == 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).parents[2])
    assert json.loads(out.stdout) == []
