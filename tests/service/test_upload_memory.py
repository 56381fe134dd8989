"""End to end: an upload is validated line by line as it streams to storage, so the API process's memory
does not grow with the file. A real `dpo-service api` process takes a 128 MB upload holding a few 2 MiB
lines, and its peak RSS stays within 64 MiB plus twice the longest line of its RSS before."""
from __future__ import annotations

import json
import secrets

import pytest

from tests.service.processes import PeakRss, start_api

pytestmark = pytest.mark.slow  # a real API process and a 128 MB upload

MIB = 1 << 20
# About a kilobyte, as a typical row: the parse costs per line, and the bound is about memory, not lines.
ROW = {"prompt": "sort : " + " ".join(f"n{i % 10}" for i in range(300)), "chosen": " n1 n4 n7 n9",
       "rejected": " n9 n7 n4 n1"}


def write_upload(path, size: int, long_line: int) -> tuple[int, int]:
    """`size` bytes of rows, every 16 MiB one `long_line` bytes long; (rows, longest line)."""
    line = json.dumps(ROW).encode() + b"\n"
    block = line * (16 * MIB // len(line))
    long_row = json.dumps({**ROW, "prompt": "n1 " * ((long_line - len(line)) // 3)}).encode() + b"\n"
    rows = written = 0
    with path.open("wb") as out:
        while written < size:
            out.write(long_row + block)
            written += len(long_row) + len(block)
            rows += 1 + len(block) // len(line)
    return rows, len(long_row) - 1


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    service = start_api(tmp_path_factory.mktemp("upload-memory"), "test-" + secrets.token_hex(8))
    yield service
    service.stop()


def test_a_large_upload_stays_within_64_mib_plus_twice_its_longest_line(api, tmp_path):
    path = tmp_path / "big.jsonl"
    rows, longest = write_upload(path, 128 * MIB, 2 * MIB)
    with api.client(timeout=600) as client:
        warm = client.post("/v1/files", files={"file": ("warm.jsonl", json.dumps(ROW))}, data={"purpose": "fine-tune"})
        assert warm.status_code == 200, warm.text  # the first request's one-off costs are not the upload's
        with PeakRss(api.procs["api"].pid) as rss, path.open("rb") as f:
            r = client.post("/v1/files", files={"file": ("big.jsonl", f)}, data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
    made = r.json()
    assert (made["bytes"], made["rows"], made["format"]) == (path.stat().st_size, rows, "text")
    assert (api.data_dir / "files" / f"{made['id']}.jsonl").stat().st_size == made["bytes"]
    bound = 64 * MIB + 2 * longest
    assert rss.growth < bound, (f"RSS grew {rss.growth / MIB:.1f} MiB (from {rss.before / MIB:.1f}, sampled peak "
                                f"{rss.sampled / MIB:.1f}, high-water mark {rss.hwm}), over {bound / MIB:.1f} MiB")


def test_a_too_long_integer_is_a_400_that_keeps_the_connection(api):
    huge = b'{"prompt": "p", "chosen": " a", "rejected": " b", "x": 1' + b"0" * 5000 + b"}\n"
    with api.client() as client:
        r = client.post("/v1/files", files={"file": ("huge.jsonl", huge)}, data={"purpose": "fine-tune"})
        assert r.status_code == 400, r.text
        assert (r.json()["error"]["code"], r.json()["error"]["problems"][0]["line"]) == ("invalid_file", 1)
        assert r.headers.get("connection", "").lower() != "close"
        assert client.get("/v1/files").status_code == 200
