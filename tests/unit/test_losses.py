"""Loss functions against values worked by hand with `math`, on one or two rows."""
import math

import pytest
import torch

import dpo_core.spec
from dpo_core.losses import LOSSES, LossInputs, LossOutput, get_loss, is_per_pair, register, sft_nll
from dpo_core.spec import LossSpec


def neg_log_sigmoid(x: float) -> float:
    return math.log(1 + math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_odds(mean_logp: float) -> float:
    return mean_logp - math.log(1 - math.exp(mean_logp))


def make_inputs(pc, pr, rc=None, rr=None, tc=None, tr=None, bc=None, br=None, grad=False) -> LossInputs:
    def t(values, default=1.0, n=None):
        values = values if values is not None else [default] * n
        return torch.tensor(values, dtype=torch.float32)

    policy_c, policy_r = t(pc), t(pr)
    policy_c.requires_grad_(grad)
    policy_r.requires_grad_(grad)
    return LossInputs(
        policy_chosen=policy_c,
        policy_rejected=policy_r,
        ref_chosen=None if rc is None else t(rc),
        ref_rejected=None if rr is None else t(rr),
        chosen_tokens=t(tc, n=len(pc)),
        rejected_tokens=t(tr, n=len(pr)),
        beta_chosen=t(bc, 0.1, len(pc)),
        beta_rejected=t(br, 0.1, len(pr)),
    )


# Two pairs with different betas. Row 0: δ = (-2 - -3) - (-4 - -3.5) = 1.5, β = 0.5, βδ = 0.75.
# Row 1: δ = (-1 - -1) - (-1 - -2) = -1, β = 2, βδ = -2.
TWO_PAIRS = dict(pc=[-2.0, -1.0], pr=[-4.0, -1.0], rc=[-3.0, -1.0], rr=[-3.5, -2.0], bc=[0.5, 2.0], br=[0.5, 2.0])


def run(name: str, inputs: LossInputs, **spec) -> LossOutput:
    return get_loss(name)(inputs, LossSpec(type=name, **spec))


# ---- registry --------------------------------------------------------------------------------------


def test_registry_matches_spec_loss_types():
    assert set(LOSSES) == set(dpo_core.spec.LOSS_TYPES)


def test_unknown_loss_names_the_known_ones():
    with pytest.raises(ValueError, match="sigmoid"):
        get_loss("dpo-typo")


def test_registered_loss_is_found_by_name():
    @register("test-only-zero")
    def zero(inputs, spec):
        zeros = torch.zeros_like(inputs.policy_chosen)
        return LossOutput(zeros, zeros, zeros, {})

    try:
        assert get_loss("test-only-zero") is zero
        with pytest.raises(ValueError, match="test-only-zero"):
            register("test-only-zero")(zero)
    finally:
        LOSSES.pop("test-only-zero")


# ---- paired losses with a reference ------------------------------------------------------------


def test_sigmoid_uses_each_rows_beta():
    out = run("sigmoid", make_inputs(**TWO_PAIRS))
    expected = [neg_log_sigmoid(0.75), neg_log_sigmoid(-2.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)


def test_rewards_are_beta_times_log_ratio_and_detached():
    out = run("sigmoid", make_inputs(**TWO_PAIRS, grad=True))
    assert out.chosen_rewards.tolist() == pytest.approx([0.5 * 1.0, 2.0 * 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([0.5 * -0.5, 2.0 * 1.0])
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_cdpo_label_smoothing():
    out = run("sigmoid", make_inputs(**TWO_PAIRS), label_smoothing=0.1)
    expected = [0.9 * neg_log_sigmoid(x) + 0.1 * neg_log_sigmoid(-x) for x in (0.75, -2.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["sigmoid", "robust"])
def test_label_smoothing_zero_is_plain_dpo(name):
    out = run(name, make_inputs(**TWO_PAIRS), label_smoothing=0.0)
    assert out.losses.tolist() == pytest.approx([neg_log_sigmoid(0.75), neg_log_sigmoid(-2.0)], rel=1e-6)


def test_robust_value():
    eps = 0.2
    out = run("robust", make_inputs(**TWO_PAIRS), label_smoothing=eps)
    # -log σ(-x) = neg_log_sigmoid(-x), so + ε log σ(-x) = - ε neg_log_sigmoid(-x).
    expected = [((1 - eps) * neg_log_sigmoid(x) - eps * neg_log_sigmoid(-x)) / (1 - 2 * eps) for x in (0.75, -2.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)


def test_ipo_value():
    out = run("ipo", make_inputs(**TWO_PAIRS))
    # (δ - 1/(2β))²: row 0 (1.5 - 1)² = 0.25, row 1 (-1 - 0.25)² = 1.5625.
    assert out.losses.tolist() == pytest.approx([0.25, 1.5625])


def test_hinge_value():
    inputs = make_inputs(**{**TWO_PAIRS, "bc": [1.0, 2.0], "br": [1.0, 2.0]})
    out = run("hinge", inputs)
    # relu(1 - βδ): row 0 1 - 1.5 < 0 gives 0, row 1 1 - (-2) = 3.
    assert out.losses.tolist() == pytest.approx([0.0, 3.0])


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "robust", "kto"])
def test_reference_losses_refuse_missing_reference(name):
    with pytest.raises(ValueError, match="reference"):
        run(name, make_inputs(pc=[-1.0], pr=[-2.0]))


# ---- reference-free ----------------------------------------------------------------------------

# Chosen: π = -2 over 4 tokens (ℓ̄ = -0.5); rejected: π = -6 over 3 tokens (ℓ̄ = -2).
FREE = dict(pc=[-2.0], pr=[-6.0], tc=[4.0], tr=[3.0], bc=[2.0], br=[2.0])


def test_simpo_value_without_reference():
    out = run("simpo", make_inputs(**FREE), gamma=0.5)
    # β (ℓ̄_c - ℓ̄_r) - γ = 2 (-0.5 + 2) - 0.5 = 2.5
    assert out.losses.item() == pytest.approx(neg_log_sigmoid(2.5), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-1.0)
    assert out.rejected_rewards.item() == pytest.approx(-4.0)


def test_orpo_value_without_reference():
    out = run("orpo", make_inputs(**FREE), orpo_lambda=0.1)
    ratio = -neg_log_sigmoid(log_odds(-0.5) - log_odds(-2.0))
    assert out.losses.item() == pytest.approx(0.5 - 0.1 * ratio, rel=1e-6)
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(ratio, rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(2.0 * -0.5)


def test_orpo_is_finite_when_a_completion_has_probability_one():
    inputs = make_inputs(pc=[0.0], pr=[-3.0], tc=[2.0], tr=[3.0], grad=True)
    out = run("orpo", inputs)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(inputs.policy_chosen.grad).all()


def test_sft_nll_is_mean_token_nll_of_chosen():
    assert sft_nll(make_inputs(**FREE)).tolist() == pytest.approx([0.5])


# ---- KTO -----------------------------------------------------------------------------------------


def test_kto_value():
    # Δ desirable [1, -0.5], undesirable [0.5]: z = mean = 1/3. β = 0.5, w_d = 1, w_u = 2.
    inputs = make_inputs(pc=[-1.0, -2.0], rc=[-2.0, -1.5], pr=[-3.0], rr=[-3.5], bc=[0.5, 0.5], br=[0.5])
    out = run("kto", inputs, undesirable_weight=2.0)
    z = 1 / 3
    expected = [1 - sigmoid(0.5 * (1 - z)), 1 - sigmoid(0.5 * (-0.5 - z)), 2 * (1 - sigmoid(0.5 * (z - 0.5)))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["kl"].item() == pytest.approx(z)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, -0.25])


def test_kto_reference_point_is_clamped_at_zero():
    # Δ all negative: mean -1 clamps to z = 0.
    inputs = make_inputs(pc=[-2.0], rc=[-1.0], pr=[-3.0], rr=[-2.0], bc=[1.0], br=[1.0])
    out = run("kto", inputs)
    assert out.metrics["kl"].item() == 0.0
    assert out.losses.tolist() == pytest.approx([1 - sigmoid(-1.0), 1 - sigmoid(1.0)], rel=1e-6)


@pytest.mark.parametrize("empty", ["desirable", "undesirable"])
def test_kto_with_one_side_empty(empty):
    # The present side has Δ = [0.5, 1.5], so z = 1; β = 1.
    rows = dict(p=[-1.0, -1.0], r=[-1.5, -2.5], b=[1.0, 1.0])
    none = dict(p=[], r=[], b=[])
    d, u = (none, rows) if empty == "desirable" else (rows, none)
    inputs = make_inputs(pc=d["p"], rc=d["r"], bc=d["b"], pr=u["p"], rr=u["r"], br=u["b"], grad=True)
    out = run("kto", inputs)
    sign = 1 if empty == "undesirable" else -1  # desirable: σ(β(Δ - z)); undesirable: σ(β(z - Δ))
    expected = [1 - sigmoid(sign * (0.5 - 1)), 1 - sigmoid(sign * (1.5 - 1))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    out.losses.sum().backward()
    assert (empty == "desirable") == (inputs.policy_chosen.grad.numel() == 0)


def test_kto_empty_batch_has_zero_kl():
    out = run("kto", make_inputs(pc=[], rc=[], pr=[], rr=[]))
    assert out.losses.numel() == 0 and out.metrics["kl"].item() == 0.0


# ---- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(dpo_core.spec.LOSS_TYPES))
def test_gradients_reach_the_policy_and_are_finite(name):
    inputs = make_inputs(**{**TWO_PAIRS, "tc": [3.0, 2.0], "tr": [4.0, 2.0]}, grad=True)
    smoothing = {"label_smoothing": 0.1} if name in ("sigmoid", "robust") else {}
    out = run(name, inputs, **smoothing)
    out.losses.sum().backward()
    for grad in (inputs.policy_chosen.grad, inputs.policy_rejected.grad):
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(n for n in LOSSES if is_per_pair(n)))
def test_per_pair_losses_give_each_pair_the_same_loss_alone(name):
    # The promise behind dpo_core.pairhead: a pair's loss does not depend on the other pairs.
    three = dict(pc=[-2.0, -1.0, -7.0], pr=[-4.0, -1.0, -2.0], rc=[-3.0, -1.0, -6.0], rr=[-3.5, -2.0, -2.5],
                 tc=[2.0, 1.0, 5.0], tr=[3.0, 2.0, 1.0], bc=[0.5, 2.0, 0.1], br=[0.5, 2.0, 0.1])
    whole = run(name, make_inputs(**three)).losses
    for i in range(3):
        alone = make_inputs(**{k: [v[i]] for k, v in three.items()})
        assert run(name, alone).losses.item() == pytest.approx(whole[i].item(), abs=1e-7)


def test_kto_is_not_per_pair():
    assert not is_per_pair("kto")  # its reference point is a batch mean
