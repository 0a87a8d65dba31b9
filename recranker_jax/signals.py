"""Signals honoured at all times: SIGTERM and the first Ctrl-C stop a command within seconds,
even while XLA compiles or inside a step that will not finish.

Python runs a signal handler only between bytecodes of the main thread, so a main thread
blocked in a long XLA call would not see a Ctrl-C until that call returned (minutes, or
never). `install` (the CLI's entry point) adds a watchdog thread that the C-level signal
handler wakes through `signal.set_wakeup_fd`: after a SIGTERM or SIGINT it gives the main
thread `grace_s()` seconds (RECRANKER_STOP_GRACE_S, default 10) to stop the normal way (the
training loops finish their step and save a checkpoint; everything else unwinds through its
`finally` blocks), then it runs the registered cleanups itself (`cleanup`: the stage's
partial folder, the run's lock) and ends the process. A second signal ends it at once. While
a checkpoint is being written (`saving`) the watchdog waits for the write to end, so the
newest checkpoint is whole; a second signal still ends the process at once (the previous
checkpoint is kept: Orbax renames a checkpoint into place only when it is complete).

Exit codes: 130 for Ctrl-C (SIGINT), 143 for SIGTERM (128 + the signal number, as a shell
reports a process a signal ended). A stage stopped this way is never marked finished: its
marker is written only after its build returned.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
_cleanups: list[Callable[[], None]] = []
_lock = threading.Lock()
_saving = [0]
_installed = [False]
_finishing: list[int] = []  # the exit code the main thread chose, once it is ending the process itself


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt (so every `finally`
    and `except BaseException` cleanup runs), with the exit code 143."""

    exit_code = 143


def exit_code(err: BaseException) -> int:
    """The exit code of an interrupt: 143 for SIGTERM, 130 for Ctrl-C."""
    return getattr(err, "exit_code", 130)


def grace_s() -> float:
    """Seconds the main thread gets to stop by itself after the first signal."""
    try:
        return max(float(os.environ.get("RECRANKER_STOP_GRACE_S", "10")), 0.0)
    except ValueError:
        return 10.0


@contextlib.contextmanager
def cleanup(action: Callable[[], None]) -> Iterator[None]:
    """Run `action` (it must be idempotent) if the watchdog ends the process inside this block."""
    with _lock:
        _cleanups.append(action)
    try:
        yield
    finally:
        with _lock:
            if action in _cleanups:
                _cleanups.remove(action)


@contextlib.contextmanager
def saving() -> Iterator[None]:
    """A checkpoint is being written: the watchdog waits for it (a second signal does not)."""
    with _lock:
        _saving[0] += 1
    try:
        yield
    finally:
        with _lock:
            _saving[0] -= 1


def finishing(code: int) -> None:
    """The main thread is ending the process with `code` (its error line printed): should the
    exit itself hang (a distributed runtime's shutdown), the watchdog ends it with this code."""
    _finishing.append(code)


def _raise_terminated(number, frame) -> None:
    raise Terminated()


def install() -> None:
    """SIGTERM raises `Terminated` in the main thread, and the watchdog backs up both signals
    (module docstring). Call once, from the main thread of a command-line process."""
    if _installed[0] or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_end,), name="recranker-signal-watchdog", daemon=True).start()
    _installed[0] = True


def _watch(read_end: int) -> None:
    received: list[int] = []
    deadline = None
    while True:
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        ready, _, _ = select.select([read_end], [], [], 1.0 if timeout is None else min(timeout, 1.0))
        if ready:
            for number in os.read(read_end, 64):
                if number in EXIT_CODES:
                    received.append(number)
            if len(received) >= 2:
                _force_exit(received[0], "a second signal")
            if received and deadline is None:
                deadline = time.monotonic() + grace_s()
        elif deadline is not None and time.monotonic() >= deadline:
            with _lock:
                busy = _saving[0] > 0
            if not busy:
                _force_exit(received[0], f"it did not stop within {grace_s():g} s")


def _force_exit(number: int, why: str) -> None:
    """Run the cleanups, say why in one line, end the process with the signal's exit code (or,
    when the main thread was already ending it, quietly with the code it chose)."""
    if _finishing:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(_finishing[0])
    with _lock:
        actions = list(reversed(_cleanups))
    for action in actions:
        try:
            action()
        except Exception:  # noqa: BLE001 - ending anyway; the next command repairs what is left
            pass
    name = "SIGTERM" if number == signal.SIGTERM else "Ctrl-C"
    try:
        sys.stderr.write(f"\nerror: stopped by {name} ({why}); run the same command again to resume (finished "
                         "stages and saved checkpoints are kept)\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    os._exit(EXIT_CODES[number])
