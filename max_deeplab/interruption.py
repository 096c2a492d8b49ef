"""SIGTERM handled like Ctrl-C, so that long-running verbs clean up or save before they exit.

Python turns SIGINT (Ctrl-C) into `KeyboardInterrupt`, which unwinds through `finally` and
`except BaseException` blocks. SIGTERM — what `kill`, job schedulers and container runtimes
send — ends the process at once by default, skipping them: an interrupted `convert` left its
temporary shards behind and an interrupted `train` lost the steps since its last checkpoint.
Within `signals_raise_interrupted()` both signals raise `Interrupted` (a `KeyboardInterrupt`),
so the same cleanup runs for either. `signals_held()` keeps them off a short section that
must not be cut in half (renaming finished shards into place, saving a checkpoint).

No TensorFlow here: `convert` uses this before it imports TensorFlow.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _in_main_thread() -> bool:
    # Python runs signal handlers in the main thread only, and only there may they be set.
    return threading.current_thread() is threading.main_thread()


def _restore(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        # None: a handler installed outside Python; the default is the closest we can restore.
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise `Interrupted(signum)` in the main thread.

    Outside the main thread (where handlers cannot be set) the block runs unchanged.
    """
    if not _in_main_thread():
        yield
        return

    def raise_interrupted(signum, _frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in HANDLED_SIGNALS}
    try:
        yield
    finally:
        _restore(previous)


class HeldSignals:
    """What arrived while `signals_held` was active."""

    def __init__(self) -> None:
        self.signums: list[int] = []

    @property
    def first(self) -> int | None:
        return self.signums[0] if self.signums else None


@contextlib.contextmanager
def signals_held(deliver: bool = True) -> Iterator[HeldSignals]:
    """Within the block, SIGINT and SIGTERM are only recorded; at its end the first one is
    delivered to the handler that was in force before (``deliver=False``: left to the caller,
    which finds them in the yielded `HeldSignals`).

    For short sections that must not be cut in half. Outside the main thread: a no-op.
    """
    held = HeldSignals()
    if not _in_main_thread():
        yield held
        return
    previous = {s: signal.signal(s, lambda signum, _frame: held.signums.append(signum))
                for s in HANDLED_SIGNALS}
    try:
        yield held
    finally:
        _restore(previous)
    if deliver and held.first is not None:
        signal.raise_signal(held.first)
