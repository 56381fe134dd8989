"""Which models a job may name: a hub id (`org/name`), or a local directory under one of the allowed
model directories (`DPO_MODEL_DIRS`, by default the data directory's `models/`). Anything else, such
as `/etc`, `../other-team`, `~/.ssh` or a symlink out of an allowed directory, is refused, so no
request makes a worker read a file of its choosing. A local model directory is scanned too: a file in
it (such as `chat_template.jinja`) that is a symbolic link to a file outside every allowed directory
refuses the model, naming the file. Links that stay inside (a Hugging Face cache's `snapshots/` ->
`blobs/`) are followed. The API checks at submission (and that the directory exists); the worker
checks again under its own settings before it loads anything.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# A Hugging Face hub id: a name, or owner/name; letters, digits, '.', '_', '-'; no '..'.
_SEGMENT = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT})?$")
MODEL_FILES = ("config.json", "adapter_config.json")


def model_problem(name: str, allowed: list[Path], must_exist: bool = True) -> str | None:
    """Why a job may not use `name` as a model, or None when it may."""
    dirs = ", ".join(str(d) for d in allowed)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "the model name holds control characters"
    if name.startswith("/"):
        return _local_problem(name, allowed, dirs, must_exist)
    if not HUB_ID.match(name) or ".." in name:
        return (f"{name!r} is neither a hub id (owner/name) nor an absolute path under an allowed model "
                f"directory ({dirs}, set by DPO_MODEL_DIRS)")
    if Path(name).exists():
        # transformers would load a relative local path before asking the hub: no guessing where it points.
        return f"{name!r} names a local path relative to the service's directory; give its absolute path under {dirs}"
    return None


def _local_problem(name: str, allowed: list[Path], dirs: str, must_exist: bool) -> str | None:
    resolved = _real(Path(name))  # symlinks followed: one pointing out of an allowed directory is refused
    if resolved is None or not _inside(resolved, allowed):
        return f"model path {name!r} is outside the allowed model directories ({dirs}, set by DPO_MODEL_DIRS)"
    if must_exist and not any((resolved / f).is_file() for f in MODEL_FILES):
        return f"unknown model: {name!r} is not a model directory (no config.json); put the model under {dirs}"
    if resolved.is_dir() and (link := link_out(resolved, allowed)):
        return (f"model {name!r} holds {link}, a symbolic link that leads outside the allowed model directories "
                f"({dirs}); replace the link with the file itself, or move its target under {dirs}")
    return None


def link_out(root: Path, allowed: list[Path]) -> str | None:
    """The first path under directory `root` (relative to it) that is a symbolic link whose real path is
    outside every allowed directory (or that loops), or None. Links inside are followed, each real
    directory scanned once."""
    seen: set[Path] = set()
    todo = [root]
    while todo:
        directory = todo.pop()
        real = _real(directory)
        if real is None or real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue  # unreadable: loading the model fails there, with its own error
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink() and ((target := _real(path)) is None or not _inside(target, allowed)):
                return path.relative_to(root).as_posix()
            if entry.is_dir():  # follows a link, which by now stays inside
                todo.append(path)
    return None


def _real(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None


def _inside(path: Path, allowed: list[Path]) -> bool:
    return any(path == d or path.is_relative_to(d) for d in allowed)
