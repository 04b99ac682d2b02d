"""A dependency-free progress bar for the command-line tools."""
import sys


def progress(done: int, total: int, label: str) -> None:
    """A bar redrawn in place on a terminal; one line per step in a log."""
    width = 30
    filled = width * done // max(total, 1)
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}"
    if sys.stderr.isatty():
        sys.stderr.write(f"\r{line:<100.100}" + ("\n" if done == total else ""))
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
