"""Local scratch files and folders named after the process that owns them.

A shard being written, an export being assembled or a checkpoint being downloaded lives in a temporary file or
folder that the writer removes when it finishes or fails. A process that is killed (SIGKILL, the OOM killer, a
preempted node's Ray actor) removes nothing, and a dataset's worth of shards or a checkpoint download would stay in
/tmp for good. So every scratch name carries its owner's host name and pid, and creating one first removes the
same kind's scratch left by this host's processes that no longer exist (the host name keeps containers that share a
temp folder, each with its own pids, off each other's files).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from contextlib import suppress


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


def _owner() -> str:
    """``<host>-<pid>-``: who a scratch name belongs to."""
    return f"{_host()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep(prefix: str, directory: str | None = None) -> list[str]:
    """Remove ``prefix<host>-<pid>-...`` entries of ``directory`` (default: the temp folder) of this host whose pid
    is not running; returns the paths removed. Live processes' entries, other hosts' and other names stay."""
    directory = directory or tempfile.gettempdir()
    pattern = re.compile(re.escape(f"{prefix}{_host()}-") + r"(\d+)-")
    removed = []
    with suppress(OSError):
        names = os.listdir(directory)
        for name in names:
            m = pattern.match(name)
            if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
                continue
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with suppress(FileNotFoundError):
                    os.unlink(path)
            removed.append(path)
    return removed


def scratch_file(prefix: str, suffix: str = "", directory: str | None = None) -> tuple[int, str]:
    """``tempfile.mkstemp`` with this host and pid in the name, after sweeping the dead processes' files."""
    sweep(prefix, directory)
    return tempfile.mkstemp(suffix=suffix, prefix=prefix + _owner(), dir=directory)


def scratch_dir(prefix: str, directory: str | None = None) -> str:
    """``tempfile.mkdtemp`` with this host and pid in the name, after sweeping the dead processes' folders."""
    sweep(prefix, directory)
    return tempfile.mkdtemp(prefix=prefix + _owner(), dir=directory)
