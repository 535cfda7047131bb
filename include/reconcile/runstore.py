"""Run storage: the folder through which the tasks of one run hand work to each other across machines.

`<runs>/<run id>/<entity>/` holds the run's manifest (begin_run), one Parquet extract per system
(extract_system, on any worker) and the gate outcomes (validate_system); load_staging reads the extracts on
the warehouse worker. `load/<target>/` holds each target's change set and its load journal (stages/load.py:
exported on the warehouse worker, applied on any worker, recorded on the warehouse worker). `<runs>` is the config's `runs_url`: a local path by default (`<state_dir>/runs`), or
any fsspec URL (`s3://bucket/prefix`, `file:///shared/runs`, ...), so an extract written by worker A is staged
by worker B. Credentials come from the filesystem's usual sources (environment, instance roles, fsspec's
`FSSPEC_<PROTOCOL>_<OPTION>` variables), never from the config.

Every file appears whole or not at all (written under a temporary name, then moved), so a worker killed
mid-write leaves only a dot-file that no reader looks at. Called by runner.py and stages/extract.py.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .config.models import Config
from .errors import ReconcileError
from .warehouse import safe_name


def _filesystem(cfg: Config) -> tuple[fsspec.AbstractFileSystem, str]:
    location = cfg.runs_location
    try:
        # No listings cache: other workers add files all the time, and a long-lived worker process (a Celery
        # child runs task after task) would otherwise believe a cached listing that misses them.
        fs, root = fsspec.core.url_to_fs(location, use_listings_cache=False)
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs installed
        raise ReconcileError(f"runs_url {location!r} cannot be opened: {e}") from None
    return fs, root.rstrip("/")


class RunFolder:
    """`<runs>/<run id>/<entity>/`: read and write the files of one run of one entity."""

    def __init__(self, cfg: Config, run_id: str, entity: str):
        self.fs, root = _filesystem(cfg)
        self.protocol = cfg.runs_location.split("://")[0] if "://" in cfg.runs_location else "file"
        self.root = f"{root}/{safe_name(run_id)}/{entity}"

    def sub(self, name: str) -> "RunFolder":
        """The folder `name` (e.g. `load/crm`) inside this one."""
        folder = object.__new__(RunFolder)
        folder.fs, folder.protocol, folder.root = self.fs, self.protocol, f"{self.root}/{name}"
        return folder

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def url(self, name: str) -> str:
        """Where a file is, for messages: a path when local, else the URL."""
        return self.path(name) if self.is_local else f"{self.protocol}://{self.path(name)}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[IO[bytes]]:
        """A binary file that becomes `name` only when the block completes; a failure leaves nothing."""
        self.fs.makedirs(self.root, exist_ok=True)
        tmp = self.path(f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with self.fs.open(tmp, "wb") as fh:
                yield fh
            self.fs.mv(tmp, self.path(name))  # a rename locally; on object stores the key appears whole
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def write_json(self, name: str, data, compact: bool = False) -> None:
        """`compact`: on one line, which json's C encoder writes (indenting goes through its Python one: a
        load's per-batch journal of thousands of outcomes took several times longer to encode)."""
        with self.writing(name) as fh:
            fh.write(json.dumps(data, indent=None if compact else 2, default=str).encode())

    def read_json(self, name: str):
        with self.fs.open(self.path(name), "rb") as fh:
            return json.loads(fh.read())

    def names(self) -> list[str]:
        """The names of the folder's files (none while it does not exist)."""
        if not self.fs.exists(self.root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    @contextlib.contextmanager
    def replacing(self, name: str) -> Iterator[Path]:
        """A local path to write a new version of `name` to; it replaces `name` (whole, or not at all) when
        the block completes."""
        with tempfile.TemporaryDirectory(prefix="reconcile-run-") as tmp:
            local = Path(tmp) / name
            yield local
            self.fs.makedirs(self.root, exist_ok=True)
            target = self.path(f".{name}.{uuid.uuid4().hex[:12]}.tmp")
            self.fs.put_file(str(local), target)
            self.fs.mv(target, self.path(name))

    def rewrite_text(self, name: str, change) -> int:
        """Replace a text file by `change(text)` when that differs; returns 1 if rewritten, else 0."""
        with self.fs.open(self.path(name), "rb") as fh:
            text = fh.read().decode("utf-8")
        new = change(text)
        if new == text:
            return 0
        with self.writing(name) as fh:
            fh.write(new.encode("utf-8"))
        return 1

    @contextlib.contextmanager
    def local(self, name: str) -> Iterator[Path]:
        """A local path to read `name` from (DuckDB reads local files): the file itself, or a temporary copy."""
        if self.is_local:
            yield Path(self.path(name))
            return
        with tempfile.TemporaryDirectory(prefix="reconcile-run-") as tmp:
            target = Path(tmp) / name
            self.fs.get(self.path(name), str(target))
            yield target


def _newest(fs: fsspec.AbstractFileSystem, folder: str) -> float:
    """The newest modification time of the files in a folder (object stores have no folder times)."""
    times = []
    for info in fs.find(folder, detail=True).values():
        t = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
        times.append(t.timestamp() if hasattr(t, "timestamp") else float(t))
    return max(times, default=0.0)


def kept_folders(cfg: Config, entity: str) -> list[RunFolder]:
    """The run folders of an entity still kept (see `prune`)."""
    fs, root = _filesystem(cfg)
    if not fs.exists(root):
        return []
    runs = [run.rstrip("/").rsplit("/", 1)[-1] for run in fs.ls(root, detail=False)]
    return [RunFolder(cfg, run, entity) for run in sorted(runs) if fs.isdir(f"{root}/{run}/{entity}")]


def prune(cfg: Config, entity: str, keep: int, current_run_id: str) -> None:
    """Keep the newest `keep` run folders of an entity (extracts for debugging); never the current run's.

    Per entity, so entities running at once never remove each other's folders."""
    fs, root = _filesystem(cfg)
    if not fs.exists(root):
        return
    current = f"{root}/{safe_name(current_run_id)}/{entity}"
    folders = [f"{run.rstrip('/')}/{entity}" for run in fs.ls(root, detail=False)]
    folders = [f for f in folders if f != current and fs.isdir(f)]
    # Newest first; equal times (S3 keeps seconds) by run id, newest first too: never a newer run for an older.
    folders.sort(key=lambda f: (_newest(fs, f), f), reverse=True)
    for folder in folders[max(keep - 1, 0):]:
        fs.rm(folder, recursive=True)
        parent = folder.rsplit("/", 1)[0]
        with contextlib.suppress(FileNotFoundError):  # object stores have no empty folders
            if not fs.ls(parent, detail=False):
                fs.rm(parent, recursive=True)
