"""Preference losses: one small pure function per loss, registered by name.

Every loss has the same signature, `(LossInputs, LossSpec) -> LossOutput`, and sees only summed
sequence log-probs: the trainer computes those, applies group weights and averages. Adding a loss is
writing one function under `@register("name")` (and adding the name to `spec.LOSS_TYPES`).

A loss registered with `per_pair=True` promises that each pair's loss depends on that pair's rows
alone (no batch statistics): the trainer may then evaluate it one group of pairs at a time, inside
the LM-head pass (dpo_core.pairhead). A unit test checks the promise for every such loss.

Notation in the docstrings: π = policy summed log-prob of a completion, ref = the reference model's,
|y| = completion tokens (incl. EOS), δ = (π_c - ref_c) - (π_r - ref_r) per pair, β per row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_core.spec import LossSpec


@dataclass
class LossInputs:
    """Per-row summed log-probs. Paired losses: Bc == Br and row i of each side is one pair."""

    policy_chosen: Tensor  # [Bc] (KTO: desirable rows), completion tokens + EOS
    policy_rejected: Tensor  # [Br] (KTO: undesirable rows)
    ref_chosen: Tensor | None  # [Bc]; None for reference-free losses
    ref_rejected: Tensor | None  # [Br]
    chosen_tokens: Tensor  # [Bc] float, tokens summed over (incl. EOS)
    rejected_tokens: Tensor  # [Br]
    beta_chosen: Tensor  # [Bc] the row's beta (multi-reward DPO: its group's beta)
    beta_rejected: Tensor  # [Br]

    def pairs(self, index: Tensor, chosen: Tensor, rejected: Tensor) -> LossInputs:
        """The pairs `index` [K] of paired inputs, with policy log-probs `chosen`, `rejected` [K]."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return LossInputs(chosen, rejected, pick(self.ref_chosen), pick(self.ref_rejected),
                          pick(self.chosen_tokens), pick(self.rejected_tokens),
                          pick(self.beta_chosen), pick(self.beta_rejected))


@dataclass
class LossOutput:
    losses: Tensor  # [B] per pair for paired losses; [Bc + Br] (chosen rows first) for KTO. Unweighted by group.
    chosen_rewards: Tensor  # [Bc] detached implicit rewards
    rejected_rewards: Tensor  # [Br] detached
    metrics: dict[str, Tensor] = field(default_factory=dict)  # extra detached scalars


LossFn = Callable[[LossInputs, LossSpec], LossOutput]
LOSSES: dict[str, LossFn] = {}
PER_PAIR_LOSSES: set[str] = set()


def register(name: str, per_pair: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator: make `fn` available as loss `name`; `per_pair`: see the module docstring."""

    def add(fn: LossFn) -> LossFn:
        if name in LOSSES:
            # A silent override would change what an existing config trains.
            raise ValueError(f"loss {name!r} is already registered; pick another name")
        LOSSES[name] = fn
        if per_pair:
            PER_PAIR_LOSSES.add(name)
        return fn

    return add


def is_per_pair(name: str) -> bool:
    """True when loss `name` may be computed on any subset of pairs with the same per-pair values."""
    return name in PER_PAIR_LOSSES


def get_loss(name: str) -> LossFn:
    """The loss registered as `name`; ValueError naming the known losses otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}") from None


def sft_nll(inputs: LossInputs) -> Tensor:
    """[Bc] mean per-token negative log-likelihood of the chosen completions: -π_c / |y_c|."""
    return -inputs.policy_chosen / inputs.chosen_tokens


# ---- shared pieces -------------------------------------------------------------------------------


def _log_ratios(inputs: LossInputs) -> tuple[Tensor, Tensor]:
    """(π_c - ref_c, π_r - ref_r), each [B]; raises if the reference log-probs are missing."""
    if inputs.ref_chosen is None or inputs.ref_rejected is None:
        raise ValueError("this loss compares against a reference model, but no reference log-probs were given")
    return inputs.policy_chosen - inputs.ref_chosen, inputs.policy_rejected - inputs.ref_rejected


def _paired(inputs: LossInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(δ [B], β [B], chosen rewards, rejected rewards) for the reference-based paired losses."""
    chosen, rejected = _log_ratios(inputs)
    # Both rows of a pair share a group, hence a beta: the chosen side's stands for the pair.
    beta = inputs.beta_chosen
    rewards_c = (inputs.beta_chosen * chosen).detach()
    rewards_r = (inputs.beta_rejected * rejected).detach()
    return chosen - rejected, beta, rewards_c, rewards_r


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, finite at x = 0 (a log-prob of exactly 0 would give -inf)."""
    # expm1 keeps precision near 0, where 1 - exp(x) cancels; clamping keeps value and gradient finite.
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.log(-torch.expm1(x))


# ---- paired losses against a reference -----------------------------------------------------------


@register("sigmoid", per_pair=True)
def sigmoid_loss(inputs: LossInputs, spec: LossSpec) -> LossOutput:
    """DPO: -log σ(βδ); with label smoothing ε (cDPO): -(1-ε) log σ(βδ) - ε log σ(-βδ). Shapes [B]."""
    delta, beta, rewards_c, rewards_r = _paired(inputs)
    eps = spec.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    return LossOutput(losses, rewards_c, rewards_r)


@register("ipo", per_pair=True)
def ipo_loss(inputs: LossInputs, spec: LossSpec) -> LossOutput:
    """IPO: (δ - 1/(2β))². Shapes [B].

    δ comes from the summed log-probs as given, the formula of the IPO paper (Azar et al. 2023). TRL
    instead averages log-probs per token for ipo, which changes the scale of δ and so the β that fits:
    a β tuned with TRL's ipo does not carry over unchanged.
    """
    delta, beta, rewards_c, rewards_r = _paired(inputs)
    losses = (delta - 1 / (2 * beta)) ** 2
    return LossOutput(losses, rewards_c, rewards_r)


@register("hinge", per_pair=True)
def hinge_loss(inputs: LossInputs, spec: LossSpec) -> LossOutput:
    """SLiC hinge: relu(1 - βδ). Shapes [B]."""
    delta, beta, rewards_c, rewards_r = _paired(inputs)
    losses = torch.relu(1 - beta * delta)
    return LossOutput(losses, rewards_c, rewards_r)


@register("robust", per_pair=True)
def robust_loss(inputs: LossInputs, spec: LossSpec) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024): [-(1-ε) log σ(βδ) + ε log σ(-βδ)] / (1 - 2ε). Shapes [B].

    Unbiased under label-flip rate ε, where cDPO is not; with ε = 0 it equals DPO.
    """
    delta, beta, rewards_c, rewards_r = _paired(inputs)
    eps = spec.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    return LossOutput(losses, rewards_c, rewards_r)


# ---- reference-free paired losses: never read ref_* ----------------------------------------------


@register("simpo", per_pair=True)
def simpo_loss(inputs: LossInputs, spec: LossSpec) -> LossOutput:
    """SimPO: -log σ(β (π_c/|y_c| - π_r/|y_r|) - γ), γ = spec.gamma. Shapes [B]. Rewards β·π/|y|."""
    rewards_c = inputs.beta_chosen * inputs.policy_chosen / inputs.chosen_tokens
    rewards_r = inputs.beta_rejected * inputs.policy_rejected / inputs.rejected_tokens
    beta = inputs.beta_chosen
    margin = beta * (inputs.policy_chosen / inputs.chosen_tokens - inputs.policy_rejected / inputs.rejected_tokens)
    losses = -F.logsigmoid(margin - spec.gamma)
    return LossOutput(losses, rewards_c.detach(), rewards_r.detach())


@register("orpo", per_pair=True)
def orpo_loss(inputs: LossInputs, spec: LossSpec) -> LossOutput:
    """ORPO: NLL(y_w) - λ log σ(log odds(ℓ̄_c) - log odds(ℓ̄_r)), λ = spec.orpo_lambda. Shapes [B].

    ℓ̄ = π/|y| is the mean token log-prob and log odds(ℓ̄) = ℓ̄ - log(1 - exp(ℓ̄)). Rewards β·ℓ̄, as TRL logs them.
    """
    mean_c = inputs.policy_chosen / inputs.chosen_tokens
    mean_r = inputs.policy_rejected / inputs.rejected_tokens
    log_odds = (mean_c - _log1mexp(mean_c)) - (mean_r - _log1mexp(mean_r))
    ratio = F.logsigmoid(log_odds)
    nll = sft_nll(inputs)
    losses = nll - spec.orpo_lambda * ratio
    metrics = {
        "log_odds_ratio": ratio.mean().detach(),
        "log_odds_chosen": log_odds.mean().detach(),
        "nll_loss": nll.mean().detach(),
    }
    rewards_c = (inputs.beta_chosen * mean_c).detach()
    rewards_r = (inputs.beta_rejected * mean_r).detach()
    return LossOutput(losses, rewards_c, rewards_r, metrics)


# ---- unpaired ------------------------------------------------------------------------------------


def _kto_reference_point(desirable: Tensor, undesirable: Tensor) -> Tensor:
    """z = max(0, mean of the log-ratios of all rows), detached; 0 for an empty batch."""
    both = torch.cat([desirable, undesirable]).detach()
    if both.numel() == 0:
        return both.new_zeros(())
    return both.mean().clamp(min=0)


@register("kto")
def kto_loss(inputs: LossInputs, spec: LossSpec) -> LossOutput:
    """KTO: desirable rows w_d·(1 - σ(β(Δ - z))), undesirable rows w_u·(1 - σ(β(z - Δ))).

    Δ = π - ref of the row; z = the batch's mean Δ clamped at 0 and detached, an estimate of the KL
    between policy and reference. Either side may be empty. losses is [Bc + Br], desirable rows first.
    """
    delta_d, delta_u = _log_ratios(inputs)
    z = _kto_reference_point(delta_d, delta_u)
    losses_d = spec.desirable_weight * (1 - torch.sigmoid(inputs.beta_chosen * (delta_d - z)))
    losses_u = spec.undesirable_weight * (1 - torch.sigmoid(inputs.beta_rejected * (z - delta_u)))
    rewards_d = (inputs.beta_chosen * delta_d).detach()
    rewards_u = (inputs.beta_rejected * delta_u).detach()
    return LossOutput(torch.cat([losses_d, losses_u]), rewards_d, rewards_u, {"kl": z})
