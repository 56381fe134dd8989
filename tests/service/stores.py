"""Stores for the publisher's tests (tests/service/test_publisher.py): real LocalStorages that take
their time or refuse, importable by the publisher's background process, which rebuilds them there."""
from __future__ import annotations

import errno
import time
from pathlib import Path

from service.artifacts import LocalStorage


class GatedStore(LocalStorage):
    """A LocalStorage whose checkpoint publishes wait until `gate` exists (an upload that takes a while)."""

    def __init__(self, root: Path, gate: Path):
        super().__init__(root)
        self.gate = gate

    def publish_dir(self, local_dir, key, arcname):
        while "checkpoint-" in key and not self.gate.exists():
            time.sleep(0.02)
        return super().publish_dir(local_dir, key, arcname)


class RefusingStore(LocalStorage):
    """A LocalStorage that refuses every checkpoint, as an unreachable object store does."""

    def publish_dir(self, local_dir, key, arcname):
        if "checkpoint-" in key:
            raise OSError(errno.EIO, f"object store: could not write {key}: ServiceUnavailable")
        return super().publish_dir(local_dir, key, arcname)
