"""Precomputed reference log-probs kept on disk and reused (spec.reference_cache, reference_mode: precomputed).

A sweep over beta, learning rate or loss type runs the same reference over the same rows every time.
`cache_key(spec)` names what the tables depend on; `<reference_cache>/<key>.pt` holds them. A file is
used only when it says the same key and has the run's row counts; any other is ignored with a warning
and replaced by the tables this run computes.

What the key covers: the reference's identity (reference_model, else model and adapter; a local
directory by its files' bytes, see `_fingerprint`; a hub id as given), the tokenizer's source, the training and
validation files' bytes (sha256), max_length, max_prompt_length, precision and the dtype the reference's
weights are held in (reference.frozen_dtype; the LoRA base runs in the policy's fp32), whether the loss
splits pairs into unpaired rows (kto), the transformers version (its model code is the forward), and
FORMAT. Left out because they change the numbers by rounding alone: the batch layout (share_prompt, batch
sizes, pad_to_multiple_of, logprob_chunk_size), the device, the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_core.callbacks import Callbacks
from dpo_core.reference import frozen_dtype
from dpo_core.spec import TrainingSpec

FORMAT = 1  # the file's layout and the key's recipe: raised when either changes
HASH_THREADS = 8  # files hashed at once (hashlib lets go of the GIL): weights come in shards of a few GB


def cache_key(spec: TrainingSpec) -> str:
    """A hex name that changes whenever the reference log-probs of `spec`'s rows would."""
    import transformers

    separate = bool(spec.reference_model) or spec.lora is None or bool(spec.adapter)
    weights = str(frozen_dtype(spec)) if separate else "policy"
    sources: dict[str, dict] = {}  # the tokenizer's directory is the model's or the adapter's: read it once

    def source(name: str) -> dict:
        if name not in sources:
            sources[name] = _source(name)
        return sources[name]

    parts = {
        "format": FORMAT,
        "reference": source(spec.reference_model) if spec.reference_model else
        {"model": source(spec.model), "adapter": source(spec.adapter) if spec.adapter else None},
        "tokenizer": source(spec.tokenizer_source),
        "train": _file_sha256(spec.train_file),
        "validation": _file_sha256(spec.validation_file) if spec.validation_file else None,
        "max_length": spec.max_length, "max_prompt_length": spec.max_prompt_length,
        "precision": spec.precision, "weights": weights, "unpaired": spec.loss.unpaired,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def _source(name: str) -> dict:
    """A model, adapter or tokenizer: a local directory by its files, a hub id by its name."""
    path = Path(name)
    if not path.is_dir():
        return {"hub": name}
    return {"dir": _fingerprint(path)}


def _fingerprint(directory: Path) -> list:
    """The directory's top-level files (what from_pretrained reads), each by its bytes' sha256.

    The bytes, weights included, not a file's size and mtime: a checkpoint fetched from the service's
    object store carries its tar's whole-second mtimes, and two jobs' checkpoints of one model have the same
    sizes and may well be saved in the same second. The price is a read of the weights at about 1 GB/s a
    thread (sha256 on a shared CPU), a small part of the reference pass a hit saves.
    """
    from concurrent.futures import ThreadPoolExecutor

    paths = sorted(p for p in directory.iterdir() if p.is_file())
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        return [[p.name, digest] for p, digest in zip(paths, pool.map(_known_sha256, paths))]


# sha256 of files this process has hashed, by (path, inode, size, mtime_ns, ctime_ns): a service worker
# keys the cache before a run and the run keys it again, and a model's weights are read once. A file
# written again, or a new file in its place, changes its ctime_ns.
_DIGESTS: dict[tuple, str] = {}


def _known_sha256(path: Path) -> str:
    info = path.stat()
    ident = (str(path.resolve()), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    if ident not in _DIGESTS:
        _DIGESTS[ident] = _file_sha256(path)
    return _DIGESTS[ident]


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def path_for(spec: TrainingSpec, key: str) -> Path:
    return Path(spec.reference_cache) / f"{key}.pt"


def load(path: Path, key: str, rows: dict[str, int], callbacks: Callbacks) -> dict[str, torch.Tensor] | None:
    """The tables in `path` when they are this run's (the same key, a [rows, 2] float32 table per split);
    None when there is no file, or, with a warning, when it is not usable."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        problem = _mismatch(saved, key, rows)
    except Exception as err:  # noqa: BLE001 - a damaged file of any kind is only a cache miss
        problem = f"it cannot be read ({type(err).__name__})"
    if problem is None:
        return {name: saved["tables"][name] for name in rows}
    callbacks.on_warning(f"reference log-prob cache {path.name}: {problem}; the reference log-probs are computed "
                         "again", code="reference_cache_ignored")
    return None


def _mismatch(saved, key: str, rows: dict[str, int]) -> str | None:
    """Why `saved` is not this run's tables, or None."""
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("key") != key:
        return "it was made for another run (format or key differs)"
    tables = saved.get("tables")
    if not isinstance(tables, dict) or set(tables) != set(rows):
        return f"it holds the splits {sorted(tables) if isinstance(tables, dict) else []}, not {sorted(rows)}"
    for name, count in rows.items():
        table = tables[name]
        if not isinstance(table, torch.Tensor) or table.dtype != torch.float32 or tuple(table.shape) != (count, 2):
            return f"its {name} table is not [{count}, 2] float32"
        if not torch.isfinite(table).all():
            return f"its {name} table holds values that are not finite"
    return None


def save(entry: Entry, tables: dict[str, torch.Tensor], callbacks: Callbacks) -> bool:
    """Write the tables to the entry's file, appearing whole (a temporary name, then a rename). A failed write
    is a warning, never the run's end: True when written."""
    path = entry.path
    rows = {name: int(table.shape[0]) for name, table in tables.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FORMAT, "key": entry.key, "rows": rows, "tables": tables}, tmp)
        os.replace(tmp, path)
        return True
    except OSError as err:
        callbacks.on_warning(f"reference log-prob cache: {path.name} could not be written ({err.strerror or err}); "
                             "the run goes on without caching them", code="reference_cache_not_written")
        return False
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Entry:
    """A run's place in the cache: its file, its key, and the tables found there (None: compute them)."""

    path: Path
    key: str
    tables: dict[str, torch.Tensor] | None = None

    @property
    def hit(self) -> bool:
        return self.tables is not None


def lookup(spec: TrainingSpec, rows: dict[str, int], callbacks: Callbacks, d) -> Entry | None:
    """This run's entry in spec.reference_cache (None without one). Every process reads the file; the tables
    are used only when every one of them could, so that all compute them together otherwise."""
    from dpo_core import distributed

    if not spec.reference_cache or spec.reference_mode != "precomputed" or not spec.loss.needs_reference:
        return None
    key = cache_key(spec)
    entry = Entry(path_for(spec, key), key)
    tables = load(entry.path, key, rows, callbacks if d.main else Callbacks())
    if not distributed.any_true(tables is None, d):
        entry.tables = tables
    return entry
