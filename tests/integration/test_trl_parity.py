"""Parity with TRL 1.16: dpo_core's numbers equal `trl.DPOTrainer`'s on the same policy, reference and data.

TRL's conventions that these tests pin down (trl/trainer/dpo_trainer.py, TRL 1.16):
  * `_prepare_dataset`: text completions get the EOS *text* appended; prompt and prompt+completion are
    tokenized whole and the completion starts where the two first differ. Conversational rows go through
    `apply_chat_template` (prompt with add_generation_prompt=True) and get no EOS.
  * `DataCollatorForPreference`: chosen rows, then rejected rows, right-padded; with `max_length` each
    prompt+completion is cut from the right (`truncation_mode="keep_start"`).
  * `_compute_loss`: log-probs summed over completion tokens; loss and rewards (beta * log-ratio) averaged
    over the pairs of a batch. `log` then averages the metrics of all batches, unweighted, so every eval
    batch here holds the same number of pairs and the mean over batches is the mean over pairs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

from dpo_core import parse_spec, train
from dpo_core.toy import build_model, make_synthetic_task

EVAL_KEYS = (
    "eval_loss",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_logps/chosen",
    "eval_logps/rejected",
)
REL = 1e-4
N_EVAL, EVAL_BATCH = 8, 4  # two equal batches: TRL's mean of batch means is then the mean over pairs
# Random-init logits are near zero, so two random models give log-ratios of a few hundredths of a nat and
# every reward sits near 0. Scaling the LM head makes the two models' distributions peaked and different:
# log-ratios of several nats, some pairs right and some wrong, hinge losses both clipped and not.
HEAD_SCALE = 40.0


def _load(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _sharpened_model(out: Path, seed: int) -> str:
    path = build_model(out, seed=seed)
    model = _load(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("parity-models")
    return _sharpened_model(root / "policy", seed=1), _sharpened_model(root / "reference", seed=2)


def _shorten(completion, keep: int):
    """The first `keep` words of a completion (text: " n1 n2 ..."; conversational: one assistant message)."""
    if isinstance(completion, str):
        return " " + " ".join(completion.split()[:keep])
    return [{**completion[0], "content": " ".join(completion[0]["content"].split()[:keep])}]


def _task(root: Path, fmt: str) -> tuple[str, str, list[dict]]:
    """The sort task, with completions cut to lengths that differ within and across pairs, so that
    padding, masks and the chosen/rejected split are all exercised."""
    train_file, eval_file = make_synthetic_task(root, n_train=8, n_eval=N_EVAL, seed=0, fmt=fmt)
    rows = _rows(eval_file)
    for i, row in enumerate(rows):
        row["chosen"] = _shorten(row["chosen"], 1 + i % 5)
        row["rejected"] = _shorten(row["rejected"], 1 + (3 * i + 2) % 5)
    Path(eval_file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train_file, eval_file, rows


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _trl_trainer(policy, reference, out, train_rows, eval_rows=None, **config) -> DPOTrainer:
    args = DPOConfig(
        output_dir=str(out),
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        **config,
    )
    return DPOTrainer(
        model=_load(policy),
        ref_model=_load(reference),
        args=args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=None if eval_rows is None else datasets.Dataset.from_list(eval_rows),
        processing_class=AutoTokenizer.from_pretrained(policy),
    )


def _assert_close(ours: dict, theirs: dict, keys) -> None:
    far = {k: (ours[k], theirs[k]) for k in keys if not math.isclose(ours[k], theirs[k], rel_tol=REL, abs_tol=0.0)}
    assert not far, f"dpo_core vs TRL differ beyond rel {REL}: {far}"


# (format, loss, max_length): max_length 11 cuts prompt (7 tokens) + completion (up to 6) from the right,
# dropping EOS from the longer completions, as TRL's keep_start truncation does.
CASES = [
    ("text", "sigmoid", 1024),
    ("text", "hinge", 1024),
    ("text", "sigmoid", 11),
    ("conversational", "sigmoid", 1024),
]


@pytest.mark.parametrize(("fmt", "loss", "max_length"), CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_eval_only_metrics_equal_trl_evaluate(models, tmp_path, fmt, loss, max_length):
    policy, reference = models
    train_file, eval_file, eval_rows = _task(tmp_path / "data", fmt)
    beta = 0.1
    spec = parse_spec(dict(
        model=policy, reference_model=reference, train_file=train_file, validation_file=eval_file,
        output_dir=str(tmp_path / "ours"), max_steps=0, batch_size=EVAL_BATCH, eval_batch_size=EVAL_BATCH,
        max_length=max_length, max_prompt_length=None, loss={"type": loss, "beta": beta}, device="cpu",
    ))
    ours = train(spec).eval_metrics

    trainer = _trl_trainer(
        policy, reference, tmp_path / "trl", _rows(train_file), eval_rows,
        loss_type=[loss], beta=beta, max_length=max_length, per_device_eval_batch_size=EVAL_BATCH,
    )
    theirs = trainer.evaluate()

    assert len(trainer.eval_dataset) == N_EVAL  # TRL dropped no row, so both averaged the same pairs
    _assert_close(ours, theirs, EVAL_KEYS)
    # Guard the test itself: the models must disagree enough for the comparison to mean something.
    assert abs(theirs["eval_rewards/margins"]) > 0.05 and 0 < theirs["eval_rewards/accuracies"] < 1


class _Losses(TrainerCallback):
    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_loss_curve_follows_trl(tiny_model, tiny_reference, tmp_path):
    """Five sigmoid DPO steps, every step on all rows (batch = dataset, so order cannot differ).

    The plain random models: their loss starts near log 2 and stays well above 0 for five steps, where the
    sharpened ones would drive it to ~0 by the third.
    """
    policy, reference = tiny_model, tiny_reference
    n, steps, lr = 8, 5, 1e-3
    train_file, _ = make_synthetic_task(tmp_path / "data", n_train=n, n_eval=4, seed=0, fmt="text")
    spec = parse_spec(dict(
        model=policy, reference_model=reference, train_file=train_file, output_dir=str(tmp_path / "ours"),
        max_steps=steps, batch_size=n, learning_rate=lr, lr_scheduler="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, group_by_length=False, max_prompt_length=None,
        loss={"type": "sigmoid", "beta": 0.1}, device="cpu",
    ))
    train(spec)
    ours = [r["loss"] for r in _rows(str(tmp_path / "ours" / "metrics.jsonl")) if "loss" in r]

    trainer = _trl_trainer(
        policy, reference, tmp_path / "trl", _rows(train_file),
        loss_type=["sigmoid"], beta=0.1, learning_rate=lr, max_steps=steps, per_device_train_batch_size=n,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        optim="adamw_torch",
    )
    recorder = _Losses()
    trainer.add_callback(recorder)
    trainer.train()

    assert len(ours) == len(recorder.losses) == steps
    assert ours[-1] < ours[0] - 0.05  # it trained: the comparison covers real updates
    far = [(i, a, b) for i, (a, b) in enumerate(zip(ours, recorder.losses)) if not math.isclose(a, b, rel_tol=REL)]
    assert not far, f"per-step losses differ beyond rel {REL} (step, dpo_core, TRL): {far}"
