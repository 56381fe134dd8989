"""Unit: OpenAI-shaped job requests become TrainingSpecs; bad ones name the parameter at fault."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from api import jobspec
from api.errors import InvalidInput
from api.schemas.jobs import JobCreate

PATHS = dict(train_path="/data/files/t.jsonl", validation_path=None, output_dir="/data/jobs/j")


def build(**request):
    return jobspec.build(JobCreate(**{"model": "m", "training_file": "file-1", **request}), **PATHS)


def dpo(**hp):
    return {"type": "dpo", "dpo": {"hyperparameters": hp}}


def test_hyperparameters_map_onto_the_spec():
    built = build(method=dpo(beta=0.2, batch_size=4, n_epochs=3, learning_rate_multiplier=2.0), seed=7,
                  training={"learning_rate": 1e-4, "max_length": 128, "max_prompt_length": 64})
    spec = built.spec
    assert (spec.loss.beta, spec.batch_size, spec.num_epochs, spec.seed) == (0.2, 4, 3, 7)
    assert spec.learning_rate == pytest.approx(2e-4)
    assert built.hyperparameters == {"beta": 0.2, "batch_size": 4, "n_epochs": 3, "learning_rate_multiplier": 2.0}


def test_auto_and_missing_hyperparameters_take_the_spec_defaults():
    built = build(method=dpo(beta="auto", batch_size="auto"))
    assert built.spec.loss.beta == 0.1 and built.spec.batch_size == 8 and built.spec.learning_rate == 5e-6
    assert built.hyperparameters["learning_rate_multiplier"] == 1.0


def test_server_paths_come_from_the_service_and_are_not_stored():
    built = build()
    assert built.spec.train_file == PATHS["train_path"] and built.spec.output_dir == PATHS["output_dir"]
    assert not {"train_file", "validation_file", "output_dir", "resume_from"} & built.stored.keys()
    again = jobspec.runnable(built.stored, "/other/t.jsonl", None, "/other/out")
    assert again.model_dump(exclude={"train_file", "output_dir"}) == built.spec.model_dump(
        exclude={"train_file", "output_dir"})


@pytest.mark.parametrize("field", ["train_file", "validation_file", "output_dir", "resume_from", "model"])
def test_training_may_not_name_server_paths(field):
    with pytest.raises(InvalidInput) as err:
        build(training={field: "/etc/passwd"})
    assert err.value.param == f"training.{field}"


def test_conflicting_values_are_refused_not_silently_chosen():
    with pytest.raises(InvalidInput) as err:
        build(method=dpo(beta=0.2), training={"loss": {"beta": 0.3}})
    assert err.value.param == "method.dpo.hyperparameters.beta"
    assert build(method=dpo(beta=0.2), training={"loss": {"beta": 0.2}}).spec.loss.beta == 0.2


def test_every_problem_is_reported_with_its_parameter():
    with pytest.raises(InvalidInput) as err:
        build(method=dpo(beta=0.2), training={"learning_rate": -1, "loss": {"type": "nope", "beta": 0.2},
                                              "typo": 1, "lora": {"r": 0}})
    message = err.value.message
    for param in ("training.learning_rate", "training.loss.type", "training.typo", "training.lora.r"):
        assert param in message


def test_deprecated_top_level_hyperparameters_are_accepted_but_not_twice():
    assert jobspec.build(JobCreate(model="m", training_file="f", hyperparameters={"batch_size": 2}),
                         **PATHS).spec.batch_size == 2
    with pytest.raises(InvalidInput) as err:
        build(hyperparameters={"batch_size": 2}, method=dpo(batch_size=2))
    assert err.value.param == "hyperparameters"


def test_learning_rate_multiplier_and_the_rate_it_makes_are_both_in_range():
    for bad in (0, -2, 1e40, True, "2"):
        with pytest.raises(ValidationError) as err:
            JobCreate(model="m", training_file="f", method=dpo(learning_rate_multiplier=bad))
        assert {e["loc"][:4] for e in err.value.errors()} == {
            ("method", "dpo", "hyperparameters", "learning_rate_multiplier")}
    with pytest.raises(InvalidInput) as err:  # 1e-3 x 1000 = 1, above the 0.1 a learning rate may be
        build(method=dpo(learning_rate_multiplier=1000), training={"learning_rate": 1e-3})
    assert err.value.param == "method.dpo.hyperparameters.learning_rate_multiplier"
    assert build(method=dpo(learning_rate_multiplier=1e4)).spec.learning_rate == pytest.approx(0.05)
    assert build(method=dpo(learning_rate_multiplier=1e-6)).spec.learning_rate == pytest.approx(5e-12)
