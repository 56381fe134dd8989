"""Samples: what the model says to a few fixed prompts, at step 0 and as it trains: the validation file's
first distinct prompts, or without one the training file's, held out from training
(dpo_core.tokenize.hold_out_for_samples).

At step 0 the reference model answers each prompt (the "before"); at each later sampling step the policy
answers them again (the "after"). Both answers are scored under the current policy by the implicit DPO
reward, beta * (log pi(y|x) - log pi_ref(y|x)) summed over the completion's tokens (dpo_core.logprobs),
and, with `samples.reward_model`, by a sequence-classification model, whose verdicts give the win rate.

Generation is batched over the prompts, left-padded, with the KV cache, greedy at temperature 0 and
otherwise sampled under a seed of its own (seed + step) inside a forked RNG, so that sampling never
changes the training run's random stream. The prompts' tokens are the tokenized validation rows' own:
a conversational row's prompt already ends with the chat template's generation prompt.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_core import compiling
from dpo_core.batching import collate
from dpo_core.logprobs import sequence_logps, unwrap
from dpo_core.spec import SamplesSpec
from dpo_core.tokenize import TokenizedRow, first_prompts


def is_due(spec, step: int, last: bool) -> bool:
    """Whether the run samples after `step`: `samples.every` steps, else each evaluation's step; always
    the last step. Step 0 (the reference's answers) is sampled before training, not here."""
    every = spec.samples.every or (spec.eval_steps if spec.validation_file else None)
    return last or (every is not None and step % every == 0)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, L] ids and attention mask, padding on the left so every prompt ends where generation starts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def cut_at_stop(ids: list[int], stop: set[int]) -> list[int]:
    """The generated ids up to and including the first stop token (padding after it dropped)."""
    for i, token in enumerate(ids):
        if token in stop:
            return ids[: i + 1]
    return ids


def stop_ids(model, tokenizer) -> set[int]:
    """EOS as the model's generation config gives it (a chat model's end-of-turn too), else the tokenizer's."""
    found = getattr(getattr(unwrap(model), "generation_config", None), "eos_token_id", None)
    found = found if found is not None else tokenizer.eos_token_id
    return set(found if isinstance(found, list) else [found]) - {None}


@torch.no_grad()
def generate(model, prompts: list[list[int]], tokenizer, spec: SamplesSpec, seed: int, device: torch.device,
             autocast=contextlib.nullcontext) -> list[list[int]]:
    """Each prompt's completion ids, stop token included, from one batched `generate` call."""
    from transformers import GenerationConfig

    stop = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    ids, mask = left_padded(prompts, pad)
    sampled = spec.temperature > 0
    # Sampled: from the whole distribution at the temperature (no top-k / top-p cut of its own).
    cut = {"temperature": spec.temperature, "top_k": 0, "top_p": 1.0} if sampled else {}
    config = GenerationConfig(max_new_tokens=spec.max_new_tokens, do_sample=sampled, use_cache=True,
                              eos_token_id=sorted(stop), pad_token_id=pad, **cut)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast(), compiling.eager():
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    finally:
        model.train(was_training)
    return [cut_at_stop(row, stop) for row in out[:, ids.shape[1]:].tolist()]


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> list[float]:
    """beta * (log pi - log pi_ref) of each completion: [N], [N] summed log-probs -> N floats."""
    return (beta * (policy_logps.float() - reference_logps.float())).tolist()


def win_rate(policy_scores: list[float], reference_scores: list[float]) -> float:
    """The share of prompts whose policy completion the reward model scores above the reference's (a tie
    counts half)."""
    wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_scores, reference_scores))
    return wins / max(len(policy_scores), 1)


def _rows(prompts: list[list[int]], completions: list[list[int]]) -> list[TokenizedRow]:
    return [TokenizedRow(i, p, c, True, None) for i, (p, c) in enumerate(zip(prompts, completions))]


@dataclass
class RewardModel:
    """A sequence-classification model that scores prompt + completion texts; higher is better."""

    model: Any
    tokenizer: Any

    @classmethod
    def load(cls, path: str, device: torch.device) -> RewardModel:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval().requires_grad_(False)
        if model.config.pad_token_id is None:  # scoring a padded batch needs the last real token's position
            pad = tokenizer.pad_token_id
            model.config.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
        return cls(model, tokenizer)

    @torch.no_grad()
    def scores(self, texts: list[str]) -> list[float]:
        self.tokenizer.padding_side = "right"
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        logits = self.model(**enc.to(self.model.device)).logits
        return logits[:, -1].float().tolist()  # one label: its score; several: the last (the "good" label)


@dataclass
class Sampler:
    """A run's fixed prompts, the reference's completions (step 0), and the optional reward model."""

    spec: SamplesSpec
    beta: float
    prompts: list[list[int]]
    reference: list[list[int]] = field(default_factory=list)
    reward_model: RewardModel | None = None
    started: float = field(default_factory=time.perf_counter)  # when the run began sampling (step 0)
    seconds: float = 0.0  # spent generating and scoring so far
    last: float = 0.0  # the latest sampling step's seconds: what the next one will take, about

    def within_budget(self, now: float) -> bool:
        """Whether samples would still be at most max_share of the run's time (since step 0's samples
        began) after one more sampling step as long as the latest."""
        return self.seconds + self.last <= self.spec.max_share * (now - self.started + self.last)

    def rewards(self, run, completions: list[list[int]]) -> list[float]:
        """Each completion's implicit reward under the run's current policy; completion i answers prompt
        i modulo the number of prompts."""
        prompts = [self.prompts[i % len(self.prompts)] for i in range(len(completions))]
        batch = collate(_rows(prompts, completions), run.tokenizer.pad_token_id).to(run.device)
        was_training = run.model.training
        run.model.eval()  # no dropout in a score
        try:
            with torch.no_grad(), run.autocast():
                policy = sequence_logps(run.model, batch, run.spec.logprob_chunk_size)
        finally:
            run.model.train(was_training)
        return implicit_rewards(policy, run.reference.logps(batch), self.beta)

    def records(self, run, policy: list[list[int]]) -> tuple[list[dict], dict]:
        """(one record per prompt: the reference's and the policy's completions, lengths and rewards; the
        summary the diagnostics and metrics.jsonl take: mean lengths, and the win rate with a reward model)."""
        decode = lambda ids: run.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        both = self.rewards(run, self.reference + policy)
        n = len(self.prompts)
        texts = [decode(p) for p in self.prompts]
        out = [{"prompt": texts[i],
                "reference": {"text": decode(self.reference[i]), "tokens": len(self.reference[i]), "reward": both[i]},
                "policy": {"text": decode(policy[i]), "tokens": len(policy[i]), "reward": both[n + i]}}
               for i in range(n)]
        summary = {"samples/length": _mean([len(c) for c in policy]),
                   "samples/reference_length": _mean([len(c) for c in self.reference])}
        if self.reward_model is not None:
            # Each distinct text scored once: a policy answer equal to the reference's ties exactly,
            # not by the noise of where in a padded batch it sat.
            scored = [texts[i % n] + " " + decode(c) for i, c in enumerate(self.reference + policy)]
            distinct = list(dict.fromkeys(scored))
            by_text = dict(zip(distinct, self.reward_model.scores(distinct)))
            scores = [by_text[t] for t in scored]
            for i, record in enumerate(out):
                record["reference"]["score"], record["policy"]["score"] = scores[i], scores[n + i]
            summary["samples/win_rate"] = win_rate(scores[n:], scores[:n])
        return out, summary


def _mean(values: list[int]) -> float:
    return round(sum(values) / max(len(values), 1), 4)


# ---------------------------------------------------------------- in a run (dpo_core.trainer)


def _reference_model(run):
    """(the model that answers as the reference, a context it answers in): the frozen reference model,
    or the LoRA policy with its adapters disabled."""
    from dpo_core.reference import AdapterReference

    if isinstance(run.reference, AdapterReference):
        return run.model, run.model.disable_adapter
    return run.reference.model.model, contextlib.nullcontext  # ModelReference's LogProbModel


def start(run, resumed: bool) -> Sampler:
    """The run's Sampler with the reference's completions. A fresh run reports them as step 0's samples; a
    resumed run makes them again (the same decoding gives the same ids) and reports nothing."""
    spec = run.spec.samples
    prompts = run.sample_prompts or first_prompts(run.eval_rows, spec.num_prompts)
    sampler = Sampler(spec, run.spec.loss.beta, prompts)
    started = sampler.started
    if spec.reward_model:
        sampler.reward_model = RewardModel.load(spec.reward_model, run.device)
    model, context = _reference_model(run)
    with context():
        sampler.reference = generate(model, sampler.prompts, run.tokenizer, spec, run.spec.seed, run.device,
                                     run.autocast)
    if not resumed:
        report(run, sampler, 0, sampler.reference, started)
    return sampler


def report(run, sampler: Sampler, step: int, completions: list[list[int]], started: float) -> None:
    """Score and report one sampling step; its summary's samples/seconds is the time it took since `started`
    (generation and scoring: what samples add to the job's time)."""
    records, summary = sampler.records(run, completions)
    seconds = time.perf_counter() - started
    sampler.seconds, sampler.last = sampler.seconds + seconds, seconds
    summary = {"step": step, **summary, "samples/seconds": round(seconds, 4)}
    run.metrics_file.append(summary)
    run.callbacks.on_samples(step, records, summary)
    for found in run.diagnostics.on_samples(summary):
        run.callbacks.on_warning(found.message, code=found.code, data={"step": found.step, **found.data})


def take(run, sampler: Sampler, last: bool) -> None:
    """The policy's completions at this step, reported with the reference's; a step before the last is
    skipped when it would take samples over their share of the run's time (samples.max_share)."""
    step, started = run.progress.step, time.perf_counter()
    if not last and not sampler.within_budget(started):
        return
    completions = generate(run.model, sampler.prompts, run.tokenizer, sampler.spec, run.spec.seed + step,
                           run.device, run.autocast)
    report(run, sampler, step, completions, started)
