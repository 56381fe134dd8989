"""TrainingSpec: one schema, every problem named at once, overrides, no torch needed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dpo_core.spec import SpecError, apply_overrides, load_spec, parse_spec

BASE = {"model": "m", "train_file": "t.jsonl"}


def test_defaults_fill_a_minimal_spec():
    spec = parse_spec(BASE)
    assert spec.loss.type == "sigmoid" and spec.loss.beta == 0.1 and spec.micro_batch == spec.batch_size


def test_every_problem_is_named_at_once():
    with pytest.raises(SpecError) as err:
        parse_spec({"train_file": 3, "loss": {"type": "nope", "beta": 0}, "batch_size": 0, "typo_key": 1})
    fields = {loc for loc, _ in err.value.problems}
    assert {"model", "batch_size", "typo_key"} <= fields
    assert any(loc.startswith("loss") for loc in fields)


def test_unknown_loss_type_lists_the_choices():
    with pytest.raises(SpecError, match="choose one of sigmoid"):
        parse_spec({**BASE, "loss": {"type": "dpo-but-better"}})


@pytest.mark.parametrize("beta", [0, -0.1])
def test_beta_must_be_positive(beta):
    with pytest.raises(SpecError, match="loss.beta"):
        parse_spec({**BASE, "loss": {"beta": beta}})


def test_cross_field_rules():
    with pytest.raises(SpecError, match="micro_batch_size"):
        parse_spec({**BASE, "batch_size": 4, "micro_batch_size": 8})
    with pytest.raises(SpecError, match="validation_file"):
        parse_spec({**BASE, "max_steps": 0})
    with pytest.raises(SpecError, match="uses no reference"):
        parse_spec({**BASE, "loss": {"type": "simpo"}, "reference_mode": "precomputed"})


def test_group_betas_and_weights():
    spec = parse_spec({**BASE, "loss": {"beta": 0.1, "beta_by_group": {"a": 0.3, "b": {"beta": 0.5, "weight": 2}}}})
    assert spec.loss.group("a").beta == 0.3 and spec.loss.group("a").weight == 1
    assert spec.loss.group("b").weight == 2 and spec.loss.group(None).beta == 0.1 and spec.loss.group("zzz").beta == 0.1


def test_overrides_parse_values_and_nest():
    out = apply_overrides({"loss": {"beta": 0.1}}, ["loss.beta=0.2", "lora.r=16", "validation_file=null", "model=x"])
    assert out == {"loss": {"beta": 0.2}, "lora": {"r": 16}, "validation_file": None, "model": "x"}
    with pytest.raises(SpecError, match="key=value"):
        apply_overrides({}, ["nonsense"])


def test_load_spec_reads_yaml_and_json(tmp_path):
    (tmp_path / "a.yaml").write_text("model: m\ntrain_file: t.jsonl\nloss:\n  type: ipo\n")
    (tmp_path / "b.json").write_text('{"model": "m", "train_file": "t.jsonl", "loss": {"type": "hinge"}}')
    assert load_spec(tmp_path / "a.yaml").loss.type == "ipo"
    assert load_spec(tmp_path / "b.json", ["loss.beta=0.3"]).loss.beta == 0.3
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "missing.yaml")


def test_spec_imports_without_torch():
    code = "import dpo_core, dpo_core.spec, dpo_core.data, sys; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_share_prompt_needs_pairs():
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE, "share_prompt": True, "loss": {"type": "kto"}})
    assert [loc for loc, _ in err.value.problems] == ["share_prompt"]
    assert parse_spec({**BASE, "share_prompt": "auto", "loss": {"type": "kto"}}).share_prompt == "auto"
