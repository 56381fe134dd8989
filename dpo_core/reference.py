"""The reference policy: a frozen model, the LoRA base with adapters disabled, or a table of
log-probs computed once before training (after which no reference model stays in memory).

Every kind answers the same question: the summed completion log-probs of a batch's sequences.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable, Protocol

import torch

from dpo_core.batching import Batch
from dpo_core.logprobs import LogProbModel, sequence_logps


class Reference(Protocol):
    def logps(self, batch: Batch) -> torch.Tensor:
        """Summed completion log-probs [N] of the batch's sequences, without gradient."""


class ModelReference:
    """A separate frozen model: the user's `reference_model`, or a copy of the initial policy.

    Its weights come in the dtype `frozen_dtype` gives (16-bit under bf16/fp16). Its log-probs are fp32
    whatever the weights: the LM-head pass computes them in fp32 (dpo_core.headlogp).
    """

    def __init__(self, model, autocast: Callable[[], contextlib.AbstractContextManager], chunk_size: int, wrap=None):
        # `wrap` shards the frozen model like the policy under FSDP, so it costs 1/world of the memory.
        module = LogProbModel(model.eval().requires_grad_(False), chunk_size)
        self.model = wrap(module) if wrap else module
        self.autocast = autocast
        # No autograd state at all (no version counters, no views tracked), except under FSDP: FSDP2's
        # unshard swaps parameters in place through version counters, which inference tensors lack.
        self.no_grad = torch.no_grad if wrap else torch.inference_mode

    def logps(self, batch: Batch) -> torch.Tensor:
        with self.no_grad(), self.autocast():
            values = self.model(batch.input_ids, batch.attention_mask, batch.targets, position_ids=batch.position_ids,
                                segments=batch.segments)[1]
        # An inference tensor may not be saved for backward: a loss whose graph saved these would fail there.
        # A copy made out here is a plain tensor, for any loss; [N] floats, nothing to speak of.
        return values.clone()


class AdapterReference:
    """The LoRA policy with its adapters switched off: the base model, without a second copy."""

    def __init__(self, peft_model, autocast, chunk_size: int):
        self.model, self.autocast, self.chunk_size = peft_model, autocast, chunk_size

    @torch.no_grad()
    def logps(self, batch: Batch) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()  # no dropout in the reference
        try:
            with self.model.disable_adapter(), self.autocast():
                return sequence_logps(self.model, batch, self.chunk_size)
        finally:
            self.model.train(was_training)


class PrecomputedReference:
    """Reference log-probs looked up by (dataset row, side); filled in one pass before training."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables  # split name -> [num_rows, 2] float32: (row, side) -> summed log-prob
        self.split = "train"

    @classmethod
    def compute(cls, reference: Reference, splits: dict[str, tuple[int, list]], filler: Batch, d) -> PrecomputedReference:
        """Tabulate `reference` over each split's batches (None: a filler batch whose result is dropped).

        Under several processes each rank computes its own rows; a sum over ranks assembles the table,
        so every rank ends with all of it and the reference model is run once per row overall.
        """
        from dpo_core import distributed

        tables = {}
        for name, (num_rows, batches) in splits.items():
            table = torch.zeros((num_rows, 2), dtype=torch.float64)
            for batch in batches:
                values = reference.logps(batch or filler).double().cpu()
                if batch is not None:
                    table[batch.row_index, batch.side] = values
            tables[name] = distributed.all_sum_tensor(table, d).float()
        return cls(tables)

    def use(self, split: str) -> PrecomputedReference:
        self.split = split
        return self

    def logps(self, batch: Batch) -> torch.Tensor:
        values = self.tables[self.split][batch.row_index, batch.side]
        return values.to(batch.input_ids.device)


def frozen_dtype(spec) -> torch.dtype | None:
    """The dtype of a separate frozen reference model's weights (ModelReference): the run's 16-bit one under
    bf16/fp16, in which autocast would cast them at every matmul anyway, so they take half the memory and
    no cast per forward. None (fp32) under fp32, and under FSDP: there the reference is sharded by the same
    fully_shard as the fp32 policy, and the sharded paths are tested (tests/integration/test_distributed.py,
    gloo on CPU) with fp32 weights only. AdapterReference shares the policy's fp32 weights, whatever this says."""
    if spec.distributed == "fsdp":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.precision)


def release(reference: ModelReference) -> None:
    """Free a reference model's memory once its log-probs are tabulated."""
    reference.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
