"""`dpo-train CONFIG [--set key=value ...]`: train (or evaluate) from a YAML or JSON config."""
from __future__ import annotations

import argparse
import sys

from dpo_core.spec import SpecError, load_spec

EXIT_USAGE = 2  # the user's input is wrong: fix the config or the data
EXIT_DIVERGED = 3  # the loss, gradient norm or weights became NaN or infinite: retune (the message says how)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpo-train", description="Train a causal LM on preference data with DPO and its variants.")
    p.add_argument("config", help="YAML or JSON file with TrainingSpec keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set loss.beta=0.2 --set lora.r=16 (repeatable)")
    p.add_argument("--report-to", metavar="NAMES", default=None,
                   help="also report metrics to these, comma-separated: tensorboard, mlflow, wandb (the config's "
                        "report_to; each needs its package: pip install 'dpo-service[tracking]')")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes (GPUs) to train on, launched with PyTorch's elastic launcher; "
                        "`distributed` in the config picks ddp (default) or fsdp")
    return p


def _report_to(names: str | None) -> list[str]:
    """--report-to as an override of report_to ("" clears it)."""
    if names is None:
        return []
    return ["report_to=[" + ", ".join(n.strip() for n in names.split(",") if n.strip()) + "]"]


def _run(spec, nproc: int, console):
    if nproc == 1:
        from dpo_core.trainer import train

        return train(spec, console)
    from dpo_core.launch import launch

    return launch(spec, nproc, "dpo_core.progress:ConsoleCallbacks")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = load_spec(args.config, args.overrides + _report_to(args.report_to))
    except SpecError as err:
        print(f"dpo-train: {err}", file=sys.stderr)
        return EXIT_USAGE
    # Heavy imports only once the config is known to be good, so a typo fails fast.
    from dpo_core.data import DataError
    from dpo_core.errors import RankFailedError, TrainingDiverged, TrainingError
    from dpo_core.progress import ConsoleCallbacks

    console = ConsoleCallbacks()
    try:
        result = _run(spec, args.nproc, console)
    except RankFailedError as err:
        print(f"dpo-train: {err}", file=sys.stderr)
        return 1
    except TrainingDiverged as err:
        print(f"dpo-train: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except (DataError, TrainingError, SpecError) as err:
        print(f"dpo-train: {err}", file=sys.stderr)
        return EXIT_USAGE
    console.close(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
