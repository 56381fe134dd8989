"""Helpers of the publisher's tests (test_publisher.py, test_worker_s3.py): stores that take their time
or refuse (importable by the publisher's background process, which rebuilds them there), a checkpoint
as the trainer leaves it, and a Publisher for a test job."""
from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

from dpo_core.layout import STATE_FILE, checkpoint_dir
from service.artifacts import LocalStorage
from worker.publisher import Publisher

JOB = "ftjob-pub"


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


def s3_with_keys(endpoint: str, bucket: str, prefix: str, key: str, secret: str):
    """An S3Storage that signs with the given keys (wrong ones: a store that refuses every request)."""
    import boto3
    from botocore.config import Config

    from service.s3store import S3Storage

    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret, region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    return S3Storage(client, bucket, prefix)


def write_checkpoint(output: Path, step: int) -> Path:
    """A checkpoint as the trainer leaves it (weights and state.json), and a line of metrics.jsonl."""
    directory = checkpoint_dir(output, step)
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(os.urandom(1024))
    (directory / STATE_FILE).write_text(json.dumps({"step": step}))
    with (output / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    return directory


def make(storage, output: Path, done: list, background: bool, factory=None, **kw) -> Publisher:
    ids = iter(f"ftckpt-{n}" for n in range(100))
    return Publisher(storage, JOB, output, output.parent / ".publish", done.append, lambda: next(ids),
                     store_factory=factory, background=background, **kw)
