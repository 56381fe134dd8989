"""Shared fixtures: a tiny local model and synthetic preference data, built once per session."""
from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.s3server"]  # the s3_server fixture: a real S3 server (SeaweedFS)

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from dpo_core.toy import build_model

    return build_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory) -> str:
    """A second tiny model with other weights, for tests that need a separate reference."""
    from dpo_core.toy import build_model

    return build_model(tmp_path_factory.mktemp("tiny-ref") / "model", seed=1)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> tuple[str, str]:
    from dpo_core.toy import make_synthetic_task

    train, held_out = make_synthetic_task(tmp_path_factory.mktemp("synthetic"), n_train=256, n_eval=64, seed=0)
    return str(train), str(held_out)
