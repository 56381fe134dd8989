"""`python -m worker [--data-dir D]`: run one Celery worker process (what `dpo-service worker` starts)."""
from __future__ import annotations

import argparse
import logging
import os

from api.settings import get_settings
from api.store.migrate import upgrade
from worker.app import create_worker_app, worker_argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dpo-service worker", description="Run one job worker (one GPU).")
    parser.add_argument("--data-dir", help="default: $DPO_DATA_DIR or ./.dpo-data")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keep the worker log readable
    settings = get_settings(data_dir=args.data_dir)
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)  # harmless when the API already did it: migrations run under a lock
    create_worker_app(settings).worker_main(worker_argv(settings, args.loglevel))


if __name__ == "__main__":
    main()
