"""A writer thread for files written while training goes on (checkpoints, sample grids).

Jobs run one at a time in the order they were queued. A failed job is raised, naming its
file, by the next `collect` (a later save checks the ones already done; the end of the run
waits for all), so a write that fails in the background still stops the run.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class WriterThread:
    def __init__(self, thread_name: str, what: str):
        self.thread_name, self.what = thread_name, what  # what: the kind of file, for error messages
        self.pending: list[tuple[str, Future]] = []
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, path: Any, fn: Callable[..., Any], *args: Any) -> None:
        """Queue the job that writes (or removes) `path`."""
        self.pending.append((str(path), self.call(fn, *args)))

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue a job that writes no file; its future is the caller's to collect."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
        return self._executor.submit(fn, *args)

    def collect(self, wait: bool = False) -> None:
        """Take the finished jobs off the queue (all of them, waiting, with `wait`); raise the
        first failure as RuntimeError("could not write <what> <path>: <reason>")."""
        while self.pending and (wait or self.pending[0][1].done()):
            path, future = self.pending.pop(0)
            try:
                future.result()
            except Exception as e:
                self.pending.clear()
                raise RuntimeError(f"could not write {self.what} {path}: {os_reason(e)}") from e

    def shutdown(self) -> None:
        """Wait for every job (raising the first failure), then end the thread."""
        try:
            self.collect(wait=True)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


def os_reason(error: BaseException) -> str:
    """The error's text, led by that of the OSError behind it: torch.save reports a full disk
    as `[enforce fail at inline_container.cc] unexpected pos ...`, with the OSError as its context."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return f"{cause.strerror} ({error})" if cause is not error else str(error)
        cause = cause.__cause__ or cause.__context__
    return str(error)
