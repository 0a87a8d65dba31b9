"""One command per run: a command that writes into runs/<name>/ holds an exclusive OS lock
(`fcntl.flock`) on runs/<name>/.lock while it runs, so a second one stops at once with one
line naming the process that holds it and since when, instead of racing it.

The lock dies with its process (kill -9 included): a lock file left behind never blocks; the
next command takes it over. The holder writes its process id, host, start time and command
into the file so that the refused command can say who holds it, and removes the file when it
ends. The lock is reentrant within a process (`recranker pipeline` holds it across its stages,
each of which takes it again). A child process that works for its holder (the single-process
stages of a multi-process run) is told so by `HELD_ENV` and does not take it again; with
several processes only process 0 takes it (pipeline.py). On a filesystem without locks
(some FUSE mounts) the command runs unlocked after a one-line warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from recranker_jax.errors import RecRankerError

LOCK_NAME = ".lock"
HELD_ENV = "RECRANKER_RUN_LOCK_HELD"  # a parent process holds the lock of this path for us

_held: dict[str, list] = {}  # lock path -> [file descriptor or None, depth, whether we created the run folder]
_warned: set[str] = set()


class RunInUse(RecRankerError):
    """Another command holds the run's lock."""


def lock_path(run_dir: Path) -> Path:
    return Path(os.path.abspath(run_dir)) / LOCK_NAME


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the file."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process (it has not written its details yet)"
    where = f" on {info['host']}" if info.get("host") and info["host"] != socket.gethostname() else ""
    command = f" ({info['command']})" if info.get("command") else ""
    return f"process {info['pid']}{where}{command}, since {info.get('started', 'an unknown time')}"


def _open_locked(path: Path, run_dir: Path) -> int | None:
    """A descriptor of `path` holding its exclusive lock, or None where the filesystem has no
    locks; RunInUse when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunInUse(f"run {run_dir} is in use by another command: {holder}; wait for it to end, or use "
                           "another run.name") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if str(path) not in _warned:
                _warned.add(str(path))
                print(f"recranker: warning: {path.parent.parent} does not support file locks ({err.strerror}); "
                      "nothing stops a second command on this run", file=sys.stderr)
            return None
        try:  # the holder removes the file as it ends: a lock on a removed file locks nothing
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """The run's exclusive lock for the duration of the block (reentrant); RunInUse, before
    anything is written, when another command holds it."""
    from recranker_jax import signals

    path = lock_path(run_dir)
    key = str(path)
    if os.environ.get(HELD_ENV) == key:  # our parent holds it for us
        yield
        return
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _open_locked(path, Path(run_dir))
    except BaseException:
        _remove_if_empty(path.parent, created)
        raise
    if fd is not None:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(["recranker", *sys.argv[1:]])[:300]}).encode())
    _held[key] = [fd, 1, created]

    def release() -> None:
        entry = _held.pop(key, None)
        if entry is None:
            return
        if entry[0] is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # while still locked: no one can take a file that is about to go
            os.close(entry[0])
        _remove_if_empty(path.parent, entry[2])

    try:
        with signals.cleanup(release):
            yield
    finally:
        release()


def _remove_if_empty(folder: Path, created: bool) -> None:
    """The run folder this command created only to lock it, when nothing else went into it."""
    if created:
        with contextlib.suppress(OSError):
            folder.rmdir()


def child_environment(run_dir: Path) -> dict[str, str]:
    """The environment entry telling a child process that its parent holds the run's lock."""
    return {HELD_ENV: str(lock_path(run_dir))}
