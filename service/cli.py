"""`dpo-service`: run the service.

    dpo-service up      [--host H] [--port P] [--data-dir D]   API + one worker, embedded defaults (dpo-service[worker])
    dpo-service api     [--host H] [--port P] [--data-dir D] [--workers N]   the API alone (production)
    dpo-service worker  [--data-dir D]                         one worker alone (one per GPU; dpo-service[worker])
    dpo-service migrate [--data-dir D]                         bring the database to the newest schema
    dpo-service admin   teams|keys|usage|pool|sweep ...        the admin API over HTTP (see service.admin_cli)

Settings come from DPO_* environment variables (service.settings.Settings); flags override them.
The worker runs as `python -m worker` in its own process, so this module never imports worker/.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service import admin_cli
from service.artifacts import make_storage
from service.auth import KEY_FILE, admin_key
from service.db.migrate import upgrade
from service.settings import Settings, settings_for_command

STOP_GRACE_S = 15


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = settings_for_command("dpo-service", data_dir=args.data_dir)
    if settings is None:
        return 2
    if args.command == "admin":
        return admin_cli.run(args, settings)
    if args.command in ("worker", "up") and importlib.util.find_spec("torch") is None:
        print("dpo-service: a worker trains with torch, which this install lacks: "
              "pip install 'dpo-service[worker]'", file=sys.stderr)
        return 2
    if args.command == "worker":
        os.execv(sys.executable, [sys.executable, "-m", "worker", "--data-dir", str(settings.data_dir),
                                  "--loglevel", args.loglevel])
    if args.command in ("api", "up") and (problem := _store_problem(settings)):
        print(f"dpo-service: {problem}", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    if args.command == "migrate":
        print(f"database at the newest schema: {_safe_url(settings.db_url)}")
        return 0
    if args.command == "api":
        return _api(settings, args.host, args.port, args.workers)
    return _up(settings, args.host, args.port)


def _store_problem(settings: Settings) -> str | None:
    """Why the store DPO_STORAGE_URL names cannot be used, said before any process starts; None if it can."""
    try:
        make_storage(settings)
    except ValueError as err:
        return str(err)
    return None


def _api(settings: Settings, host: str, port: int, workers: int = 1) -> int:
    import uvicorn

    key, created = admin_key(settings)
    if created:
        print(f"Generated the admin API key (shown once; kept in {settings.data_dir / 'api_key'}):\n  {key}",
              flush=True)
    threads = process_threads(settings, workers, os.environ)
    print(f"dpo-service API on http://{host}:{port} (dashboard at /, docs at /docs), data in {settings.data_dir}"
          f"{f', {workers} processes, {threads} request threads each' if workers > 1 else ''}", flush=True)
    # Each process builds its app from the environment (service.settings), so the flags travel there.
    os.environ["DPO_DATA_DIR"], os.environ["DPO_API_THREADS"] = str(settings.data_dir), str(threads)
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir(settings, port))
    uvicorn.run("api.server:served_app", factory=True, host=host, port=port, workers=workers, log_level="info",
                http="api.server:NoDelayProtocol")
    return 0


def _metrics_dir(settings: Settings, port: int) -> Path:
    """Where the processes of one `dpo-service api --workers N` keep their request histograms, so that a
    scrape of any of them counts every one's requests (api.metrics). Emptied at start: the counts of an
    earlier start are not this one's."""
    path = settings.data_dir / "prometheus" / f"api-{port}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def process_threads(settings: Settings, workers: int, environ) -> int:
    """Request threads for each of `workers` API processes. A process keeps a read connection per thread
    (api.main._api_engines), so N processes at the default 40 could hold 48 x N connections to
    PostgreSQL, which allows 100 by default for everyone, the workers included: without an explicit
    DPO_API_THREADS the default is shared out (at least 8 each). One process serves on one core, so
    fewer threads each cost no throughput."""
    if workers <= 1 or any(name.upper() == "DPO_API_THREADS" for name in environ):
        return settings.api_threads
    return max(8, settings.api_threads // workers)


def _up(settings: Settings, host: str, port: int) -> int:
    """API and one worker as child processes; Ctrl-C (or SIGTERM) stops both. The admin key is printed
    only when it was generated just now: stdout often ends up in a log file."""
    key, created = admin_key(settings)
    if not created:
        key = "from DPO_API_KEY" if settings.api_key is not None else f"in {settings.data_dir / KEY_FILE}"
    env = {**os.environ, "DPO_DATA_DIR": str(settings.data_dir)}
    api = subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--host", host, "--port", str(port)], env=env)
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--loglevel", "WARNING"], env=env)
    children = [api, worker]
    stop = _install_stop_handlers()
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    if _wait_healthy(url, api):
        print(f"\ndpo-service is up\n  URL:       {url}  (API docs: {url}/docs)\n"
              f"  dashboard: {url}/  (sign in with the API key)\n  API key:   {key}\n"
              f"  data:      {settings.data_dir}\nCtrl-C stops it.\n", flush=True)
    while not stop["requested"] and all(c.poll() is None for c in children):
        time.sleep(0.5)
    failed = [c for c in children if c.poll() not in (None, 0)]
    _stop(children)
    return 1 if failed and not stop["requested"] else 0


def _install_stop_handlers() -> dict:
    stop = {"requested": False}

    def handler(signum, _frame):
        stop["requested"] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _wait_healthy(url: str, api: subprocess.Popen, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and api.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    print(f"the API did not answer on {url} within {timeout_s:.0f}s", file=sys.stderr)
    return False


def _stop(children: list[subprocess.Popen]) -> None:
    """SIGTERM (the API stops; a worker stops after its current task), then SIGKILL after a grace period."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-service", description="Self-hosted DPO training service.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_, host in (("up", "API and one worker together (embedded defaults)", "127.0.0.1"),
                              ("api", "the REST API alone", "0.0.0.0")):
        cmd = commands.add_parser(name, help=help_)
        cmd.add_argument("--host", default=host)
        cmd.add_argument("--port", type=int, default=8000)
        cmd.add_argument("--data-dir", help="default: $DPO_DATA_DIR or ./.dpo-data")
    commands.choices["api"].add_argument(
        "--workers", type=int, default=1,
        help="API processes sharing the port (each takes one core at most; they share out DPO_API_THREADS's default)")
    worker = commands.add_parser("worker", help="one job worker (run one per GPU)")
    worker.add_argument("--data-dir", help="default: $DPO_DATA_DIR or ./.dpo-data")
    worker.add_argument("--loglevel", default="INFO")
    migrate = commands.add_parser("migrate", help="bring the database to the newest schema")
    migrate.add_argument("--data-dir", help="default: $DPO_DATA_DIR or ./.dpo-data")
    admin_cli.add_parser(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
