"""The fused LM head + per-pair loss (dpo_core.pairhead) against plain autograd, through step.forward_loss."""
from __future__ import annotations

import contextlib
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_core import step
from dpo_core.batching import collate
from dpo_core.logprobs import LogProbModel
from dpo_core.losses import LOSSES, is_per_pair
from dpo_core.metrics import MetricSums
from dpo_core.pairhead import pair_chunks
from dpo_core.spec import parse_spec
from dpo_core.tokenize import TokenizedPair, TokenizedRow


def test_pair_chunks_keep_pairs_whole():
    assert pair_chunks([3, 4, 2, 9, 1], chunk=8) == [(0, 2, 0, 7), (2, 3, 7, 9), (3, 4, 9, 18), (4, 5, 18, 19)]
    assert pair_chunks([2, 2], chunk=100) == [(0, 2, 0, 4)]
    assert pair_chunks([0, 0], chunk=4) == [(0, 2, 0, 0)]


def _rows(n: int, seed: int = 0, groups=(None,)) -> list[TokenizedPair]:
    rng = random.Random(seed)
    words = lambda k: [rng.randrange(4, 28) for _ in range(k)]  # noqa: E731
    return [TokenizedPair(i, words(rng.randint(1, 6)), words(rng.randint(1, 7)) + [3], words(rng.randint(1, 7)) + [3],
                          groups[i % len(groups)]) for i in range(n)]


def _run(model_dir, loss: dict, precision="fp32", groups=None, chunk=5):
    loss = {**loss, "beta_by_group": groups} if groups else loss
    spec = parse_spec(dict(model=model_dir, train_file="unused.jsonl", loss=loss, precision=precision,
                           logprob_chunk_size=chunk))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dtype = {"bf16": torch.bfloat16}.get(precision)
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
    reference = SimpleNamespace(logps=lambda batch: -2.0 - batch.targets.counts * 1.5)  # any fixed values
    needs_ref = spec.loss.needs_reference
    return SimpleNamespace(spec=spec, device=torch.device("cpu"), policy=LogProbModel(model, chunk), model=model,
                           reference=reference if needs_ref else None, autocast=autocast)


def _loss_grads_metrics(run, batch, fuse: bool, monkeypatch):
    monkeypatch.setattr(step, "_fuse", lambda r, b: fuse)
    run.model.zero_grad(set_to_none=True)
    sums = MetricSums()
    loss = step.forward_loss(run, batch, (3.0, 2.5), sums)  # norms as if other micro-batches existed
    (loss * 1.7).backward()  # an incoming gradient other than 1 (loss scaling, world size)
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    return loss.item(), grads, sums.means()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the gradient's own scale (fp32 rounding is relative to that)."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


PAIRED = sorted(name for name in LOSSES if is_per_pair(name))
CASES = [dict(type=name) for name in PAIRED] + [
    dict(type="sigmoid", sft_weight=0.7),
    dict(type="robust", label_smoothing=0.2),
    dict(type="orpo", orpo_lambda=0.3),
]


@pytest.mark.parametrize("loss", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_fused_head_gives_autograds_loss_gradients_and_metrics(tiny_model, monkeypatch, loss):
    run = _run(tiny_model, loss)
    batch = collate(_rows(5), pad_id=0)
    want = _loss_grads_metrics(run, batch, False, monkeypatch)
    got = _loss_grads_metrics(run, batch, True, monkeypatch)
    # IPO's loss is ~200 here, where fp32 steps by 1.5e-5: compare relative to size, not to 1e-6 absolute.
    assert got[0] == pytest.approx(want[0], rel=1e-6, abs=1e-6)
    assert got[2].keys() == want[2].keys()
    for key in want[2]:
        assert got[2][key] == pytest.approx(want[2][key], rel=1e-6, abs=1e-6), key
    for name, g in want[1].items():
        assert _rel(got[1][name], g) < 1e-5, (name, _rel(got[1][name], g))


@pytest.mark.parametrize("tile_columns", [None, 5])
def test_fused_head_with_group_betas_and_weights(tiny_model, monkeypatch, tile_columns):
    if tile_columns:  # the vocabulary in many tiles: logits kept tile by tile between forward and gradient
        from dpo_core import headlogp

        monkeypatch.setattr(headlogp, "CPU_TILE_ELEMENTS", 1)
        monkeypatch.setattr(headlogp, "MIN_TILE_COLUMNS", tile_columns)
    groups = {"a": {"beta": 0.5, "weight": 2.0}, "b": {"beta": 0.05, "weight": 0.0}}
    run = _run(tiny_model, dict(type="sigmoid", sft_weight=0.3), groups=groups, chunk=4)
    batch = collate(_rows(6, seed=1, groups=("a", "b", None)), pad_id=0)
    want = _loss_grads_metrics(run, batch, False, monkeypatch)
    got = _loss_grads_metrics(run, batch, True, monkeypatch)
    assert got[0] == pytest.approx(want[0], abs=1e-6)
    assert got[2] == pytest.approx(want[2], abs=1e-6)
    for name, g in want[1].items():
        assert _rel(got[1][name], g) < 1e-5, (name, _rel(got[1][name], g))


def test_fused_head_under_bf16_autocast_stays_close(tiny_model, monkeypatch):
    run = _run(tiny_model, dict(type="sigmoid"), precision="bf16")
    batch = collate(_rows(4, seed=2), pad_id=0)
    want = _loss_grads_metrics(run, batch, False, monkeypatch)
    got = _loss_grads_metrics(run, batch, True, monkeypatch)
    assert got[0] == pytest.approx(want[0], abs=1e-3)
    # Both round the head's products to bf16 (8 bits of mantissa, 0.4% per rounding), at different points
    # (the fused path scales by the incoming gradient after rounding); through two layers that is ~1%.
    for name, g in want[1].items():
        assert _rel(got[1][name], g) < 2e-2, (name, _rel(got[1][name], g))


def test_fusing_is_chosen_only_where_it_is_exact(tiny_model):
    paired = collate(_rows(2), pad_id=0)
    assert step._fuse(_run(tiny_model, dict(type="sigmoid")), paired)
    assert not step._fuse(_run(tiny_model, dict(type="sigmoid"), precision="fp16"), paired)
    with torch.no_grad():
        assert not step._fuse(_run(tiny_model, dict(type="sigmoid")), paired)
    unpaired = collate([TokenizedRow(0, [5], [6, 3], True, None), TokenizedRow(1, [5], [7, 3], False, None)], 0)
    assert not step._fuse(_run(tiny_model, dict(type="kto")), unpaired)
