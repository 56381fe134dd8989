"""dpo_core: Direct Preference Optimization and its variants, as a library and the `dpo-train` command.

`import dpo_core` and `dpo_core.spec` / `dpo_core.data` stay free of torch so that the API can validate
specs and uploads cheaply, as do `dpo_core.tokenizer_loading` and `dpo_core.preflight` (the pre-flight
data report); `train` imports the heavy stack when first used (an evaluation-only run is
`train` with max_steps 0).
"""
from dpo_core.callbacks import Callbacks
from dpo_core.spec import LossSpec, SpecError, TrainingSpec, load_spec, parse_spec

__all__ = ["Callbacks", "LossSpec", "SpecError", "TrainingSpec", "load_spec", "parse_spec", "train"]


def train(spec, callbacks=None):
    """Run a training job described by `spec`; see dpo_core.trainer.train."""
    from dpo_core.trainer import train as _train

    return _train(spec, callbacks)
