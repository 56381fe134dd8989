"""LoRA target modules the model does not have fail the run as the user's error, naming the key."""
from __future__ import annotations

import pytest

from dpo_core import parse_spec, train
from dpo_core.errors import TrainingError
from dpo_core.toy import make_synthetic_task


@pytest.mark.parametrize("targets", [["nope"], "zzz.*", ".*"])
def test_target_modules_the_model_lacks_are_a_training_spec_error(tiny_model, tmp_path, targets):
    train_file, _ = make_synthetic_task(tmp_path / "task", n_train=8, n_eval=4, seed=0)
    spec = parse_spec({"model": tiny_model, "train_file": train_file, "output_dir": str(tmp_path / "out"),
                       "max_steps": 1, "max_length": 64, "lora": {"target_modules": targets}})
    with pytest.raises(TrainingError) as err:
        train(spec)
    assert err.value.code == "invalid_training_spec"
