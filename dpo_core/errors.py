"""Errors a user can act on. Each message says what is wrong and how to fix it, in one line.

The CLI turns them into exit code 2; the service's worker turns them into a job's `error`.
SpecError (dpo_core.spec) and DataError (dpo_core.data) are ValueErrors of the same kind.
"""
from pathlib import Path


class TrainingError(RuntimeError):
    """A run cannot start or go on for a reason the user can fix."""

    code = "training_error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code  # an error relayed from another process keeps its original code


class ModelLoadError(TrainingError):
    """The model, reference model or tokenizer could not be loaded."""

    code = "model_not_found"


class CheckpointError(TrainingError):
    """A checkpoint could not be written or read back."""

    code = "checkpoint_error"


class TrainingDiverged(TrainingError):
    """The loss, the gradient norm or the weights became NaN or infinite (dpo_core.divergence)."""

    code = "training_diverged"


class RankFailedError(TrainingError):
    """A process of a multi-process run died or raised; the launcher stopped the others."""

    code = "rank_failed"


def load_error(what: str, name: str, err: Exception) -> ModelLoadError:
    """A ModelLoadError for `what` ("model", "tokenizer of", ...) `name` that failed to load with `err`."""
    hint = "a local directory with config.json" if not Path(name).exists() else "a directory saved by save_pretrained"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(f"could not load {what} {name!r}: {first} (give {hint}, or a hub id this machine can reach)")
