"""The persistent autotune cache: JSON files of tuned launch configs.

Read: every ``*.json`` shipped in tritonbn/autotune_cache (pre-tuned entries,
package data), then the user file ``$TRITONBN_CACHE_DIR/autotune.json``
(default ``~/.cache/tritonbn``); user entries win. Files are read once per
process; after that a lookup is a dict access.

Write: only the user file. Under an exclusive lock (where the OS has flock)
the file on disk is re-read, the new entry merged in, and the result written
to a temporary file that is renamed over the old one, so concurrent processes
(one per GPU under DDP) neither lose each other's entries nor leave a broken
file. A corrupt or unreadable file gives one warning and is ignored; an
unwritable directory gives one warning and the cache lives on in memory.

Layout of a file: {"format": 1, "entries": {context: {problem_key: entry}}},
where the context names the GPU, its compute capability, the triton version
and a hash of the kernel sources, so an entry made for another GPU, triton or
kernel version is never used.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

FORMAT = 1
USER_FILE = "autotune.json"

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: atomic rename only
    fcntl = None


def user_cache_dir() -> Path:
    return Path(os.environ.get("TRITONBN_CACHE_DIR") or Path.home() / ".cache" / "tritonbn")


def shipped_cache_dir() -> Path:
    return Path(importlib.import_module("tritonbn.autotune_cache").__path__[0])


class Cache:
    """path: the file new entries go to (default: the user cache file);
    shipped: read the pre-tuned entries of tritonbn/autotune_cache too."""

    def __init__(self, path: Path | None = None, shipped: bool = True):
        self.user_path = Path(path) if path is not None else user_cache_dir() / USER_FILE
        self.shipped_dir = shipped_cache_dir() if shipped else None
        self._entries: dict[str, dict[str, dict]] | None = None
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"tritonbn autotune cache: {message}", RuntimeWarning, stacklevel=4)

    def _read(self, path: Path) -> dict[str, dict[str, dict]]:
        """Entries of one file; {} (and one warning) if it is missing, unreadable or corrupt."""
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):  # nothing cached there yet
            return {}
        except (OSError, ValueError) as error:
            self._warn_once(f"read:{path}", f"ignoring {path}: {type(error).__name__}: {error}")
            return {}
        entries = data.get("entries") if isinstance(data, dict) and data.get("format") == FORMAT else None
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            self._warn_once(f"read:{path}", f"ignoring {path}: not a format-{FORMAT} tritonbn cache")
            return {}
        return entries

    def entries(self) -> dict[str, dict[str, dict]]:
        """All entries, loaded from disk on first use."""
        with self._lock:
            if self._entries is None:
                merged: dict[str, dict[str, dict]] = {}
                files = sorted(self.shipped_dir.glob("*.json")) if self.shipped_dir else []
                for path in [*files, self.user_path]:
                    for context, problems in self._read(path).items():
                        merged.setdefault(context, {}).update(problems)
                self._entries = merged
            return self._entries

    def get(self, context: str, key: str) -> dict | None:
        return self.entries().get(context, {}).get(key)

    def put(self, context: str, key: str, entry: dict) -> None:
        """Remember an entry in memory and merge it into the user file."""
        self.entries().setdefault(context, {})[key] = entry
        try:
            self._merge_into_file(context, key, entry)
        except OSError as error:
            self._warn_once(f"write:{self.user_path}",
                            f"cannot write {self.user_path} ({type(error).__name__}: {error}); "
                            f"tuned configs are kept in memory for this process only")

    def _merge_into_file(self, context: str, key: str, entry: dict) -> None:
        path = self.user_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(path.with_name(path.name + ".lock")):
            on_disk = self._read(path)
            on_disk.setdefault(context, {})[key] = entry
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": FORMAT, "entries": on_disk}, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path):
    if fcntl is None:
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
