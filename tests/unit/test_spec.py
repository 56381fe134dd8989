"""TrainingSpec: one schema, every problem named at once, overrides, no torch needed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dpo_core.fields import field_ranges
from dpo_core.spec import (
    LOSS_TYPES,
    SERVER_PATH_FIELDS,
    SpecError,
    TrainingSpec,
    apply_overrides,
    load_spec,
    parse_spec,
)

BASE = {"model": "m", "train_file": "t.jsonl"}
# max_steps: 0 (evaluate only) needs a validation file, early_stopping and load_best_at_end need one and
# eval_steps; every other value of every field needs nothing else.
WITH_VALIDATION = {**BASE, "validation_file": "v.jsonl", "eval_steps": 10}
FIELDS = [f for f in field_ranges(TrainingSpec) if f.path not in (*SERVER_PATH_FIELDS, "model")]


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
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE, "loss": {"type": "dpo-but-better"}})
    ((loc, message),) = err.value.problems
    assert loc == "loss.type" and all(name in message for name in LOSS_TYPES), message


@pytest.mark.parametrize("beta", [0, -0.1])
def test_beta_must_be_positive(beta):
    with pytest.raises(SpecError, match="loss.beta"):
        parse_spec({**BASE, "loss": {"beta": beta}})


def test_cross_field_rules_name_the_field_to_change():
    cases = [
        ({"batch_size": 4, "micro_batch_size": 8}, "micro_batch_size"),
        ({"max_length": 512, "max_prompt_length": 512}, "max_prompt_length"),
        ({"max_steps": 0}, "max_steps"),
        ({"loss": {"type": "simpo"}, "reference_mode": "precomputed"}, "reference_mode"),
        ({"distributed": "fsdp", "lora": {}}, "distributed"),
        ({"distributed": "fsdp", "precision": "fp16"}, "precision"),
        ({"loss": {"type": "ipo", "label_smoothing": 0.1}}, "loss.label_smoothing"),
        ({"early_stopping": {}, "eval_steps": 10}, "early_stopping"),
        ({"early_stopping": {}, "validation_file": "v.jsonl"}, "early_stopping"),
        ({"load_best_at_end": True, "validation_file": "v.jsonl"}, "load_best_at_end"),
    ]
    for change, field in cases:
        with pytest.raises(SpecError) as err:
            parse_spec({**BASE, **change})
        assert [loc for loc, _ in err.value.problems] == [field], change


def _nested(path: str, value) -> dict:
    """{"loss": {"beta": value}} for "loss.beta"; a group's fields go in group "g"."""
    *parents, leaf = path.replace("<group>", "g").split(".")
    out = {leaf: value}
    for part in reversed(parents):
        out = {part: out}
    return out


def _get(spec, path: str):
    node = spec.model_dump()
    for part in path.replace("<group>", "g").split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("field", [f for f in FIELDS if f.samples()], ids=lambda f: f.path)
def test_every_field_alone_takes_each_end_of_its_range(field):
    """A value the user did not set never makes a spec invalid: each field set alone, to each end of its
    range and a value between, gives a valid spec that keeps the value, and re-reads as itself (the
    worker re-validates the stored spec)."""
    for value in field.samples():
        spec = parse_spec({**WITH_VALIDATION, **_nested(field.path, value)})
        kept = min(value, spec.batch_size) if field.path == "micro_batch_size" else value  # cut to the default
        assert _get(spec, field.path) == kept, (field.path, value)
        assert parse_spec(spec.model_dump()) == spec


@pytest.mark.parametrize("field", [f for f in FIELDS if f.outside()], ids=lambda f: f.path)
def test_every_number_past_its_range_or_a_bool_is_refused_naming_it(field):
    for value in field.outside():
        with pytest.raises(SpecError) as err:
            parse_spec({**WITH_VALIDATION, **_nested(field.path, value)})
        assert [loc for loc, _ in err.value.problems] == [field.path.replace("<group>", "g")], value


def test_every_number_has_a_range_and_every_field_a_meaning():
    for f in FIELDS:
        assert f.meaning, f.path
        if f.numeric:
            assert f.low is not None and f.high is not None, f.path


@pytest.mark.parametrize("change, field", [
    ({"loss": {"beta": 1e300}}, "loss.beta"),
    ({"loss": {"beta": True}}, "loss.beta"),
    ({"learning_rate": 1e200}, "learning_rate"),
    ({"lora": {"r": 1e17}}, "lora.r"),
    ({"lora": {"r": 10**17}}, "lora.r"),
    ({"num_epochs": 1e30}, "num_epochs"),
    ({"device": "cuda:99; rm -rf /"}, "device"),
    ({"device": "cuda:64"}, "device"),
    ({"loss": {"beta_by_group": {"a": 0}}}, "loss.beta_by_group.a.beta"),
    ({"loss": {"beta_by_group": {"a": -1}}}, "loss.beta_by_group.a.beta"),
    ({"loss": {"beta_by_group": {"a": True}}}, "loss.beta_by_group.a"),
    ({"batch_size": 8.0}, "batch_size"),
    ({"batch_size": "8"}, "batch_size"),
    ({"share_prompt": "yes"}, "share_prompt"),
    ({"lora": {"target_modules": "(("}}, "lora.target_modules"),
    ({"lora": {"target_modules": []}}, "lora.target_modules"),
    ({"learning_rate": float("nan")}, "learning_rate"),
])
def test_absurd_values_are_refused_naming_the_field(change, field):
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE, **change})
    assert [loc for loc, _ in err.value.problems] == [field]


@pytest.mark.parametrize("change, expected", [
    ({"max_length": 512}, {"max_length": 512, "max_prompt_length": 256}),
    ({"max_length": 384}, {"max_length": 384, "max_prompt_length": 192}),
    ({"max_length": 4096}, {"max_length": 4096, "max_prompt_length": 512}),
    ({"max_prompt_length": 2048}, {"max_length": 4096, "max_prompt_length": 2048}),
    ({"max_prompt_length": None}, {"max_length": 1024, "max_prompt_length": None}),
    ({}, {"max_length": 1024, "max_prompt_length": 512}),
    ({"micro_batch_size": 64}, {"batch_size": 8, "micro_batch_size": 8}),
    ({"micro_batch_size": 4}, {"batch_size": 8, "micro_batch_size": 4}),
    ({"batch_size": 64, "micro_batch_size": 16}, {"batch_size": 64, "micro_batch_size": 16}),
])
def test_defaults_follow_the_fields_they_depend_on(change, expected):
    spec = parse_spec({**BASE, **change})
    assert {k: getattr(spec, k) for k in expected} == expected
    assert parse_spec(spec.model_dump()) == spec


def test_a_group_without_its_own_beta_takes_loss_beta():
    spec = parse_spec({**BASE, "loss": {"beta": 0.2, "beta_by_group": {"safe": {"weight": 0}}}})
    assert (spec.loss.group("safe").beta, spec.loss.group("safe").weight) == (0.2, 0)


def test_yaml_numbers_in_e_notation_are_numbers_and_bools_are_not(tmp_path):
    (tmp_path / "c.yaml").write_text("model: m\ntrain_file: t.jsonl\nlearning_rate: 1e-4\nloss:\n  beta: 5E-2\n")
    spec = load_spec(tmp_path / "c.yaml", ["adam_epsilon=1e-10", "max_grad_norm=null"])
    assert (spec.learning_rate, spec.loss.beta, spec.adam_epsilon, spec.max_grad_norm) == (1e-4, 0.05, 1e-10, None)
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "c.yaml", ["loss.beta=true"])
    assert [loc for loc, _ in err.value.problems] == ["loss.beta"]


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
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "missing.yaml")
    ((loc, message),) = err.value.problems
    assert loc == "config" and "missing.yaml" in message


def test_spec_imports_without_torch():
    code = "import dpo_core, dpo_core.spec, dpo_core.data, sys; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_share_prompt_needs_pairs():
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE, "share_prompt": True, "loss": {"type": "kto"}})
    assert [loc for loc, _ in err.value.problems] == ["share_prompt"]
    assert parse_spec({**BASE, "share_prompt": "auto", "loss": {"type": "kto"}}).share_prompt == "auto"


def test_early_stopping_names_what_it_lacks_and_its_direction_follows_the_metric():
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE, "early_stopping": {"patience": 2}})
    ((loc, message),) = err.value.problems
    assert loc == "early_stopping" and "validation_file" in message and "eval_steps" in message
    with pytest.raises(SpecError) as err:
        parse_spec({**WITH_VALIDATION, "early_stopping": {"metric": "loss"}})
    ((loc, message),) = err.value.problems
    assert loc == "early_stopping.metric" and "eval_loss" in message
    for metric, mode in (("eval_loss", "min"), ("eval_rewards/accuracies", "max"), ("eval_loss/safe", "min")):
        spec = parse_spec({**WITH_VALIDATION, "early_stopping": {"metric": metric}})
        assert spec.early_stopping.mode == mode and spec.best_metric == (metric, mode)
        assert parse_spec(spec.model_dump()) == spec
    spec = parse_spec({**WITH_VALIDATION, "early_stopping": {"metric": "eval_rewards/margins", "mode": "min"}})
    assert spec.best_metric == ("eval_rewards/margins", "min")
    assert parse_spec(WITH_VALIDATION).best_metric == ("eval_loss", "min")
