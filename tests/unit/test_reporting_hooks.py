"""dpo_core.reporting.Reporting (what a run with report_to wraps the caller's callbacks in) passes every
hook of Callbacks on to the caller's: a hook it left out would never reach the service's recorder."""
from __future__ import annotations

import inspect

from dpo_core.callbacks import Callbacks
from dpo_core.reporting import Reporting


class Seen(Callbacks):
    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: object.__getattribute__(self, "calls").append(name)
        return object.__getattribute__(self, name)


def test_every_hook_reaches_the_callers_callbacks_through_reporting():
    hooks = [name for name, _ in inspect.getmembers(Callbacks, inspect.isfunction) if name.startswith("on_")]
    assert "on_samples" in hooks and "on_checkpoint" in hooks
    for name in hooks:
        inner = Seen()
        params = [p for p in inspect.signature(getattr(Callbacks, name)).parameters.values()
                  if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
        getattr(Reporting(inner, []), name)(*[None] * len(params))
        assert inner.calls == [name], name
