"""spec.reference_cache: precomputed reference log-probs written by one run and read by the next, only when
the reference, the data and the sequence settings are the same."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpo_core import Callbacks, parse_spec, train
from dpo_core import trainer as trainer_module
from dpo_core.reference import ModelReference
from dpo_core.refcache import cache_key


class _Seen(Callbacks):
    def __init__(self):
        self.info, self.warnings = {}, []

    def on_start(self, info):
        self.info = info

    def on_warning(self, message, *, code=None, data=None):
        self.warnings.append((code, message))


def _spec(tiny_model, tiny_reference, data, out, cache, **extra):
    train_file, held_out = data
    base = dict(model=tiny_model, reference_model=tiny_reference, train_file=str(train_file),
                validation_file=str(held_out), output_dir=str(out), reference_mode="precomputed",
                reference_cache=str(cache), learning_rate=1e-3, batch_size=4, max_steps=3, logging_steps=1,
                max_length=64, max_prompt_length=32, loss={"type": "sigmoid", "beta": 0.1})
    return parse_spec({**base, **extra})


def _numbers(out: Path) -> list[dict]:
    """The run's metrics records without the timings (elapsed_s, step_time_s, tokens_per_s)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(("_s", "_per_s"))} for r in records]


@pytest.fixture()
def data(tmp_path):
    from dpo_core.toy import make_synthetic_task

    train_file, held_out = make_synthetic_task(tmp_path / "data", n_train=24, n_eval=8, seed=0)
    return Path(train_file), Path(held_out)


@pytest.fixture()
def spied(monkeypatch):
    """What the trainer loads and what runs a reference model (the real functions, counted)."""
    seen = {"loaded": [], "reference_calls": 0}
    load, logps = trainer_module.load_causal_lm, ModelReference.logps

    def counted_load(name, *args, **kwargs):
        seen["loaded"].append(name)
        return load(name, *args, **kwargs)

    def counted_logps(self, batch):
        seen["reference_calls"] += 1
        return logps(self, batch)

    monkeypatch.setattr(trainer_module, "load_causal_lm", counted_load)
    monkeypatch.setattr(ModelReference, "logps", counted_logps)
    return seen


def test_a_second_run_reads_the_tables_and_never_runs_the_reference(tiny_model, tiny_reference, data, tmp_path, spied):
    cache = tmp_path / "cache"
    first_seen, second_seen = _Seen(), _Seen()
    train(_spec(tiny_model, tiny_reference, data, tmp_path / "a", cache), first_seen)
    assert first_seen.info["reference_cache"] == "stored" and spied["reference_calls"] > 0
    (stored,) = cache.glob("*.pt")
    spied["loaded"].clear()
    spied["reference_calls"] = 0
    train(_spec(tiny_model, tiny_reference, data, tmp_path / "b", cache), second_seen)
    assert second_seen.info["reference_cache"] == "hit" and not second_seen.warnings
    assert tiny_reference not in spied["loaded"] and spied["reference_calls"] == 0
    # The same losses, rewards and evaluation to the last bit as the run that computed the tables.
    assert _numbers(tmp_path / "b") == _numbers(tmp_path / "a")
    assert list(cache.glob("*.pt")) == [stored]


def test_the_frozen_copy_is_not_made_on_a_hit(tiny_model, data, tmp_path, spied, monkeypatch):
    cache, copies = tmp_path / "cache", []
    frozen_copy = trainer_module.frozen_copy
    monkeypatch.setattr(trainer_module, "frozen_copy", lambda *a, **k: copies.append(1) or frozen_copy(*a, **k))
    seen = _Seen()
    train(_spec(tiny_model, None, data, tmp_path / "a", cache, max_steps=1))
    train(_spec(tiny_model, None, data, tmp_path / "b", cache, max_steps=1), seen)
    assert seen.info["reference_cache"] == "hit" and copies == [1]


def test_changed_data_or_max_length_miss_the_cache(tiny_model, tiny_reference, data, tmp_path):
    cache = tmp_path / "cache"
    base = _spec(tiny_model, tiny_reference, data, tmp_path / "a", cache, max_steps=0)
    train(base)
    longer = _spec(tiny_model, tiny_reference, data, tmp_path / "b", cache, max_steps=0, max_length=80)
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(data[0].read_bytes() + b"\n")  # a blank line more: the same rows, other bytes
    other_data = _spec(tiny_model, tiny_reference, (edited, data[1]), tmp_path / "c", cache, max_steps=0)
    keys = {cache_key(s) for s in (base, longer, other_data)}
    assert len(keys) == 3
    seen = _Seen()
    train(longer, seen)
    assert seen.info["reference_cache"] == "stored"
    assert {p.stem for p in cache.glob("*.pt")} == {cache_key(base), cache_key(longer)}
    # What the key ignores: the loss's own settings, the batch layout.
    assert cache_key(_spec(tiny_model, tiny_reference, data, tmp_path / "d", cache, max_steps=0, batch_size=2,
                           loss={"type": "ipo", "beta": 0.5})) == cache_key(base)


@pytest.mark.parametrize("damage", ["garbage", "other-key", "other-rows"])
def test_a_corrupt_or_mismatched_file_is_ignored_with_a_warning(tiny_model, tiny_reference, data, tmp_path, damage):
    cache = tmp_path / "cache"
    spec = _spec(tiny_model, tiny_reference, data, tmp_path / "a", cache, max_steps=0)
    train(spec)
    path = cache / f"{cache_key(spec)}.pt"
    good = torch.load(path, weights_only=True)
    assert good["rows"] == {"train": 24, "eval": 8} and good["tables"]["train"].dtype == torch.float32
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "other-key":
        torch.save({**good, "key": "0" * 40}, path)
    else:
        torch.save({**good, "tables": {**good["tables"], "train": good["tables"]["train"][:-1]}}, path)
    seen = _Seen()
    result = train(_spec(tiny_model, tiny_reference, data, tmp_path / "b", cache, max_steps=0), seen)
    assert seen.info["reference_cache"] == "stored"
    assert [code for code, _ in seen.warnings] == ["reference_cache_ignored"]
    assert torch.equal(torch.load(path, weights_only=True)["tables"]["train"], good["tables"]["train"])
    assert result.eval_metrics["eval_loss"] > 0


def test_reference_cache_needs_precomputed_and_is_a_server_path():
    from dpo_core.spec import SERVER_PATH_FIELDS, SpecError

    assert "reference_cache" in SERVER_PATH_FIELDS
    with pytest.raises(SpecError, match="reference_cache"):
        parse_spec({"model": "m", "train_file": "t.jsonl", "reference_cache": "/tmp/c"})


@pytest.mark.slow
def test_two_ranks_read_the_tables_one_rank_made(tiny_model, data, tmp_path):
    """Every rank reads the file (and all agree to use it): none is written, and the losses are one rank's."""
    from dpo_core.launch import launch

    cache = tmp_path / "cache"
    train(_spec(tiny_model, None, data, tmp_path / "one", cache, device="cpu", distributed="ddp", max_steps=2))
    (path,) = cache.glob("*.pt")
    made = path.stat()
    launch(_spec(tiny_model, None, data, tmp_path / "two", cache, device="cpu", distributed="ddp", max_steps=2), nproc=2)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    assert [r["loss"] for r in _numbers(tmp_path / "two") if "loss" in r] == pytest.approx(
        [r["loss"] for r in _numbers(tmp_path / "one") if "loss" in r], rel=1e-5)
