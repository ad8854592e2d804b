"""`Fanout`: the other sides of a mirrored write (a pair's S-VOLs, a shadow set's other members)
run on a small pool of reusable threads while the calling thread writes its own side, so the
writes overlap: each one waits in pwritev or on the link with the GIL released. A mirrored
write then costs about its slowest side instead of the sum of them.

Only a write that waits for its device (FUA, or the write cache off: `waits`) is worth it. A
buffered write is a copy into the page cache, quicker done in turn than handed to a thread
(about 20 us: a wake-up and the GIL coming back). Measured on a 2-core host: a 4 KiB buffered
pair write on tmpfs took 34-37 us in turn and 48-52 us side by side, 1 MiB gained nothing;
with O_DSYNC on two files of one ext4 disk a 1 MiB pair write went from 1.23 to 1.09 ms and
a two-member shadow set's from 1.44 to 1.18 ms (medians; one disk's bandwidth bounds both).
Sides not worth a thread run in turn, as with `workers=0`.

Every side is waited for before the command ends, whatever failed: the sides write from the
host's buffers (the ring's data area, reused once the command completes) and under the
region lock and write intent the caller holds.

With `workers=0` a side runs on the calling thread when it is waited for, after the caller's
own side: the order of writes before overlapping existed, which a crash-model test needs to
pass the same fault points in the same order on every run.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

DEFAULT_WORKERS = 8  # a LUN's default io_workers: every command's other side can run at once


def waits(fua: bool, write_cache: bool) -> bool:
    """Whether a write waits for its device (FUA, or no write cache): then its other sides
    are worth running beside it."""
    return fua or not write_cache


class Pending:
    """One side of a write started on a `Fanout`: `wait` for it to end, `result` to raise its
    error (after it ended)."""

    __slots__ = ("_call", "_future")

    def __init__(self, future: Future[None], call: Callable[[], None] | None = None) -> None:
        self._future = future
        self._call = call  # a side in turn: it runs when waited for

    def wait(self) -> None:
        """Return once the side ended (never raises: the error stays for `result`)."""
        call, self._call = self._call, None
        if call is not None:
            try:
                call()
            except BaseException as e:  # kept for result(), which re-raises it
                self._future.set_exception(e)
            else:
                self._future.set_result(None)
        wait_futures([self._future])

    def drop(self) -> None:
        """The caller's own side failed: a side in turn that has not run never runs (the
        write stops there, as it always did in turn); one beside it is waited for."""
        if self._call is not None:
            self._call = None
            self._future.set_result(None)
        self.wait()

    def result(self) -> None:
        self.wait()
        self._future.result()

    def exception(self) -> BaseException | None:
        self.wait()
        return self._future.exception()


class Fanout:
    """Up to `workers` threads, started when first needed and reused, for the other sides of
    one volume's writes. `close` once no write can start any more."""

    def __init__(self, name: str, workers: int = DEFAULT_WORKERS) -> None:
        if workers < 0:
            raise ValueError(f"{name}: workers must be 0 (in order) or more, not {workers}")
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) if workers else None
        )

    def start(self, call: Callable[[], None], beside: bool) -> Pending:
        """Start `call` beside the caller's own side; in turn (deferred to its wait) when not
        `beside` or with no workers."""
        if self._pool is None or not beside:
            return Pending(Future(), call)
        return Pending(self._pool.submit(call))

    def run(self, calls: list[Callable[[], None]], beside: bool) -> list[BaseException | None]:
        """Run the first call on this thread and the others beside it (or after it: `start`);
        once every one has ended, each one's error (None: it succeeded), in order."""
        if not calls:
            return []
        first, *others = calls
        sides = [self.start(c, beside) for c in others]
        outcomes: list[BaseException | None] = [None]
        try:
            first()
        except BaseException as e:  # returned once the others ended, as theirs are
            outcomes[0] = e
        for side in sides:
            side.wait()
            outcomes.append(side.exception())
        return outcomes

    def close(self) -> None:
        """Stop the threads (after any side still running)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
