"""A pool of screening processes that a long-running service starts once and hands to every
screen call (``screen_paths(..., pool=pool)``), from any thread.

The screen's own pool (``ScreenConfig.workers``) forks, which is only safe from a process's
main thread; the hub's API and the portal screen in executor threads. This pool starts its
processes with ``spawn`` (a fresh interpreter: no lock of another thread is copied), when a
screen first needs them, and keeps them until :meth:`ScreenPool.shutdown`. A worker also
exits when the process that started it is gone. As with any ``spawn`` pool, a program
run as a script file must keep its work under ``if __name__ == "__main__":`` (a worker
imports the main module again); ``python -m`` modules and console scripts are fine.

What a worker needs to check images (the settings and the screening indexes, several MB
of fingerprints) is pickled once per screen to a private file and loaded once per worker;
each batch of images carries only that file's key.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter, OrderedDict
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .engine import _check_images

_LOADED: "OrderedDict[str, tuple]" = OrderedDict()  # in a worker: key -> (config, indexes)
_KEEP = 2


def _watch_parent(parent: int, folder: str) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:  # killed without a shutdown: leave nothing behind
            shutil.rmtree(folder, ignore_errors=True)
            os._exit(0)


def _init_worker(parent: int, folder: str) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")  # see engine._init_worker
    threading.Thread(target=_watch_parent, args=(parent, folder), daemon=True).start()


def _check(key: str, path: str, batch: list) -> tuple[int, list]:
    context = _LOADED.get(key)
    if context is None:
        with open(path, "rb") as fh:
            context = pickle.load(fh)  # written by this pool's owner, in its private folder
        _LOADED[key] = context
        while len(_LOADED) > _KEEP:
            _LOADED.popitem(last=False)
    return os.getpid(), _check_images(batch, context)


class _Context:
    """One screen's settings and indexes, as the workers load them."""

    def __init__(self, key: str, path: str, config, indexes):
        self.key, self.path, self.config, self.indexes = key, path, config, indexes
        self.users = 0


class ScreenPool:
    """``workers`` processes (0: one per CPU) that check images for any screen given this
    pool. Thread-safe; :meth:`shutdown` (or leaving a ``with`` block) stops them. Nothing
    starts before a screen first needs it."""

    def __init__(self, workers: int = 0, *, start_method: str = "spawn"):
        if workers < 0:
            raise ValueError(f"workers must be 0 (one per CPU) or more, not {workers}")
        self.workers = workers or os.cpu_count() or 1
        self.start_method = start_method
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._dir: str | None = None
        self._contexts: list[_Context] = []
        #: Batches of images checked, by the pid of the process that checked them.
        self.batches_by_pid: Counter = Counter()
        self.closed = False

    # --- what the screen calls ---------------------------------------------------------

    def checker(self, config, indexes) -> "_Checker":
        """An executor-like view of the pool for one screen's (config, indexes)."""
        return _Checker(self, self._acquire(config, list(indexes)))

    def _acquire(self, config, indexes: list) -> _Context:
        with self._lock:
            if self.closed:
                raise RuntimeError("the screening pool was shut down")
            for ctx in self._contexts:
                if ctx.config == config and len(ctx.indexes) == len(indexes) and all(
                        a is b for a, b in zip(ctx.indexes, indexes)):
                    ctx.users += 1
                    return ctx
            if self._executor is None:
                self._dir = tempfile.mkdtemp(prefix="medzone-screen-pool-")  # 0700
                self._executor = self._new_executor()
            key = uuid.uuid4().hex
            path = os.path.join(self._dir, key)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                pickle.dump((config, indexes), fh, protocol=pickle.HIGHEST_PROTOCOL)
            ctx = _Context(key, path, config, indexes)
            ctx.users = 1
            self._contexts.append(ctx)
            return ctx

    def _release(self, ctx: _Context) -> None:
        with self._lock:
            ctx.users -= 1
            # Keep the latest few: the next screen of the same datasets reuses them.
            idle = [c for c in self._contexts if c.users == 0]
            for old in idle[:-_KEEP]:
                self._contexts.remove(old)
                try:
                    os.unlink(old.path)
                except OSError:
                    pass

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, multiprocessing.get_context(self.start_method),
                                   initializer=_init_worker, initargs=(os.getpid(), self._dir))

    def _submit(self, ctx: _Context, batch: list) -> Future:
        executor = self._executor
        try:
            inner = executor.submit(_check, ctx.key, ctx.path, batch)
        except BrokenProcessPool:
            # A worker died (killed, out of memory): the screens it served fail closed;
            # later ones get fresh processes.
            with self._lock:
                if self.closed:
                    raise
                if self._executor is executor:
                    executor.shutdown(wait=False, cancel_futures=True)
                    self._executor = self._new_executor()
                executor = self._executor
            inner = executor.submit(_check, ctx.key, ctx.path, batch)
        outer: Future = Future()

        def done(f: Future) -> None:
            if f.cancelled():
                outer.set_exception(CancelledError())
                return
            err = f.exception()
            if err is not None:
                outer.set_exception(err)
                return
            pid, results = f.result()
            with self._lock:
                self.batches_by_pid[pid] += 1
            outer.set_result(results)

        outer.set_running_or_notify_cancel()
        inner.add_done_callback(done)
        outer.inner = inner  # type: ignore[attr-defined]
        return outer

    # --- the owner's side -------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        return sorted((getattr(self._executor, "_processes", None) or {}).keys())

    def shutdown(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __copy__(self) -> "ScreenPool":
        return self  # one set of processes: a copied config (traitlets) shares it

    def __deepcopy__(self, memo) -> "ScreenPool":
        return self

    def __enter__(self) -> "ScreenPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class _Checker:
    """What the screen's image checks of one file see: ``submit(fn, batch)`` and
    ``shutdown(...)``, as for its own pool; shutting it down releases the screen's context,
    never the shared pool."""

    def __init__(self, pool: ScreenPool, ctx: _Context):
        self.pool, self.ctx = pool, ctx
        self.futures: list[Future] = []
        self.released = False

    def submit(self, _fn, batch: list) -> Future:
        future = self.pool._submit(self.ctx, batch)
        self.futures.append(future)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        if self.released:
            return
        self.released = True
        for f in self.futures:
            if cancel_futures:
                f.inner.cancel()
            if wait and not f.inner.cancelled():
                try:
                    f.inner.exception()
                except Exception:  # noqa: BLE001 - cancelled meanwhile
                    pass
        self.pool._release(self.ctx)


__all__ = ["ScreenPool"]
