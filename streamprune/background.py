"""Background work for the layer loop: the next layer is read, and the last one made durable,
while the current one computes.

A `Worker` is one thread that runs jobs in the order they were submitted, so that shard bytes,
activation checkpoints and run state reach the disk in the same order as without it. With
`enabled=False` every job runs at once in the caller's thread (--no-overlap): the same calls in the
same order, with a job's error raised where the threaded one would raise it (wait or result).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable


class Worker:
    def __init__(self, name: str, enabled: bool = True):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) if enabled else None
        self._pending: list[Future] = []
        self._failed = False

    def submit(self, job: Callable, *args) -> Future:
        """Queue `job(*args)`; its result (or error) comes from the returned future. Once a job has
        failed, later ones are skipped: a resume point must never be saved after a lost write."""
        if self._pool is not None:
            future = self._pool.submit(self._run, job, args)
        else:
            future = Future()
            try:
                future.set_result(self._run(job, args))
            except Exception as err:  # re-raised by result(), as a thread's would be; Ctrl-C goes at once
                future.set_exception(err)
        # finished jobs are forgotten (their results belong to whoever holds the future); failed
        # ones are kept for wait() to re-raise
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        self._pending.append(future)
        return future

    def _run(self, job: Callable, args: tuple):
        if self._failed:
            raise RuntimeError("skipped: an earlier background job failed")
        try:
            return job(*args)
        except BaseException:
            self._failed = True
            raise

    def wait(self) -> None:
        """Block until every job submitted so far is done; re-raise the first error among them."""
        pending, self._pending = self._pending, []
        wait(pending)
        for future in pending:
            future.result()

    def close(self) -> BaseException | None:
        """Let the queued jobs finish, then stop the thread; returns the first error among jobs
        not yet waited on (for a caller that is already failing and reports its own error)."""
        pending, self._pending = self._pending, []
        wait(pending)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        return next((f.exception() for f in pending if f.exception() is not None), None)
