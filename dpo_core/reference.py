"""The reference policy: a frozen model, the LoRA base with adapters disabled, or a table of
log-probs computed once before training (after which no reference model stays in memory).

Every kind answers the same question: the summed completion log-probs of a batch's sequences.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterable, Protocol

import torch

from dpo_core.batching import Batch
from dpo_core.logprobs import sequence_logps


class Reference(Protocol):
    def logps(self, batch: Batch) -> torch.Tensor:
        """Summed completion log-probs [N] of the batch's sequences, without gradient."""


class ModelReference:
    """A separate frozen model: the user's `reference_model`, or a copy of the initial policy."""

    def __init__(self, model, autocast: Callable[[], contextlib.AbstractContextManager], chunk_size: int):
        self.model = model.eval().requires_grad_(False)
        self.autocast, self.chunk_size = autocast, chunk_size

    @torch.no_grad()
    def logps(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            return sequence_logps(self.model, batch, self.chunk_size)[0]


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
                return sequence_logps(self.model, batch, self.chunk_size)[0]
        finally:
            self.model.train(was_training)


class PrecomputedReference:
    """Reference log-probs looked up by (dataset row, side); filled in one pass before training."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables  # split name -> [num_rows, 2] float32, NaN where not computed
        self.split = "train"

    @classmethod
    def compute(cls, reference: Reference, splits: dict[str, tuple[int, Iterable[Batch]]], device) -> PrecomputedReference:
        tables = {}
        for name, (num_rows, batches) in splits.items():
            table = torch.full((num_rows, 2), float("nan"))
            for batch in batches:
                table[batch.row_index, batch.side] = reference.logps(batch.to(device)).float().cpu()
            tables[name] = table
        return cls(tables)

    def use(self, split: str) -> PrecomputedReference:
        self.split = split
        return self

    def logps(self, batch: Batch) -> torch.Tensor:
        values = self.tables[self.split][batch.row_index, batch.side]
        return values.to(batch.input_ids.device)


def release(reference: ModelReference) -> None:
    """Free a reference model's memory once its log-probs are tabulated."""
    reference.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
