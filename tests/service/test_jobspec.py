"""Unit: OpenAI-shaped job requests become TrainingSpecs; bad ones name the parameter at fault."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from api import ranges
from service import jobspec
from service.errors import InvalidInput
from service.requests import JobCreate

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


def test_the_services_retention_is_the_default_save_total_limit_and_the_job_overrides_it():
    def limit(**training):
        req = JobCreate(model="m", training_file="file-1", training=training)
        return jobspec.build(req, **PATHS, keep_checkpoints=3).spec.save_total_limit

    assert limit() == 3 and limit(save_total_limit=1) == 1
    assert limit(save_total_limit=None) is None  # null: every checkpoint is kept


DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"
PAIRS = jobspec.DataFile(rows=1000, paired=True)


def test_the_table_of_ranges_in_docs_is_the_one_the_schemas_give():
    text = DOCS.read_text()
    start, end = text.index(ranges.BEGIN) + len(ranges.BEGIN), text.index(ranges.END)
    assert text[start:end].strip() == ranges.table(), "run python -m api.ranges and paste its table into docs/api.md"


def _request(param: str, value) -> dict:
    """A request body with only `param` set, e.g. training.lora.r or method.dpo.hyperparameters.beta."""
    *parents, leaf = param.replace("<group>", "g").split(".")
    out = {leaf: value}
    for part in reversed(parents):
        out = {part: out}
    return out


REQUEST_FIELDS = [(param, f) for param, f, _, _ in ranges.request_ranges()]


@pytest.mark.parametrize("param, field", [(p, f) for p, f in REQUEST_FIELDS if f.samples()], ids=lambda x: x
                         if isinstance(x, str) else "")
def test_every_request_field_alone_takes_each_end_of_its_range(param, field):
    """Set alone to each end of its range (and a value between), every field of a request gives a job
    that validates, with its files' facts too: no default the user did not choose gets in the way
    (early_stopping and load_best_at_end compare evaluations during training: with eval_steps)."""
    for value in field.samples():
        body = _request(param, value)
        if param.startswith("method."):
            body["method"]["type"] = "dpo"
        if param.startswith(("training.early_stopping", "training.load_best_at_end")):
            body["training"]["eval_steps"] = 10
        built = jobspec.build(JobCreate(model="m", training_file="file-1", validation_file="file-2", **body),
                              PATHS["train_path"], "/data/files/v.jsonl", PATHS["output_dir"], PAIRS, PAIRS)
        assert built.spec is not None


@pytest.mark.parametrize("param, field", [(p, f) for p, f in REQUEST_FIELDS if f.outside() and
                                          not p.startswith("training.")], ids=lambda x: x if isinstance(x, str) else "")
def test_job_fields_and_hyperparameters_past_their_range_or_a_bool_are_refused(param, field):
    for value in field.outside():
        body = _request(param, value)
        if param.startswith("method."):
            body["method"]["type"] = "dpo"
        with pytest.raises(ValidationError) as err:
            JobCreate(model="m", training_file="file-1", **body)
        assert {".".join(str(p) for p in e["loc"] if "-" not in str(p) and "[" not in str(p))
                for e in err.value.errors()} == {param}, value


def test_the_service_refuses_a_device_but_cpu():
    assert build(training={"device": "cpu"}).spec.device == "cpu"
    for device in ("cuda", "cuda:1", "cuda:99; rm -rf /", True, ["cpu"]):
        with pytest.raises(InvalidInput) as err:
            build(training={"device": device})
        assert err.value.param == "training.device"


def test_what_the_trainer_would_refuse_of_the_files_is_refused_at_submission():
    unpaired = jobspec.DataFile(rows=10, paired=False)
    with pytest.raises(InvalidInput) as err:
        jobspec.build(JobCreate(model="m", training_file="f"), **PATHS, train=unpaired)
    assert err.value.param == "training_file"
    with pytest.raises(InvalidInput) as err:
        jobspec.build(JobCreate(model="m", training_file="f", validation_file="v"), PATHS["train_path"], "/v",
                      PATHS["output_dir"], PAIRS, unpaired)
    assert err.value.param == "validation_file"
    kto = jobspec.build(JobCreate(model="m", training_file="f", training={"loss": {"type": "kto"}}), **PATHS,
                        train=unpaired)
    assert kto.spec.loss.type == "kto"
    # 1000 epochs of a million rows one at a time would be 10^9 steps: refused, naming where the epochs came from.
    big = jobspec.DataFile(rows=10**6, paired=True)
    with pytest.raises(InvalidInput) as err:
        jobspec.build(JobCreate(model="m", training_file="f", method=dpo(n_epochs=1000, batch_size=1)), **PATHS,
                      train=big)
    assert err.value.param == "method.dpo.hyperparameters.n_epochs"
    with pytest.raises(InvalidInput) as err:  # kto trains on both rows of each pair
        jobspec.build(JobCreate(model="m", training_file="f", training={"loss": {"type": "kto"}, "batch_size": 1,
                                                                       "num_epochs": 6}), **PATHS, train=big)
    assert err.value.param == "training.num_epochs"
    limited = JobCreate(model="m", training_file="f", method=dpo(n_epochs=1000, batch_size=1),
                        training={"max_steps": 100})
    assert jobspec.build(limited, **PATHS, train=big).spec.max_steps == 100
