"""Executors: what executes a queued template run, once the queue gives it a slot.

The run queue (:mod:`medzone_hub.runqueue`) decides *which* queued run goes next (fair
across users, within the zone's slots, GPU-aware); an executor decides *where* and *how*
it executes. Every executor executes the same thing: :func:`medzone_hub.runner.execute_run`
in the user's bubblewrap sandbox (the local machine, or a cluster node), which moves the
run's row from ``queued`` to ``running`` and then ``done``, ``failed`` or ``cancelled``
and appends the ``run.execute`` audit row. So the store, not the executor, is where a
run's state lives; an executor only adds what it alone knows.

The interface (stable: every executor implements exactly this)::

    class Executor:
        name: str                                   # "local", "slurm"; stored in runs.executor
        def submit(self, home, store, run_id) -> str
        def poll(self, run) -> str | None
        def cancel(self, run) -> None
        def slots(self) -> int | None
        def free_gpus(self) -> int | None
        def close(self) -> None
        def wake_fds(self) -> list[int]                 # optional; default []

* ``submit(home, store, run_id)`` — start executing run *run_id* (``queued`` in the store,
  already claimed by the queue for this executor) and return at once with the executor's
  job id for it (a string of at most 255 characters: a pid, a Slurm job id), which the
  queue records in ``runs.executor_job``. It does not wait for the run. It raises a
  :class:`~medzone_hub.errors.MedZoneError` when the run could not be submitted at all
  (the queue marks the run failed with that one-line message).
* ``poll(run)`` — the executor's own view of a submitted run (a
  :class:`~medzone_hub.models.Run` row, ``executor_job`` set): ``"queued"`` (submitted,
  not started yet, e.g. pending in Slurm), ``"running"``, ``"done"``, ``"failed"``, or
  ``None`` when the executor knows nothing of that job (it never existed or is long gone).
  The queue uses it to tell a run that is still on its way from one that is lost: a run
  still ``queued``/``running`` in the store whose job polls ``"done"``/``"failed"``/``None``
  is marked failed with the reason (the job ended without recording an outcome).
* ``cancel(run)`` — stop the submitted run's execution (kill the sandbox, ``scancel`` the
  job); quiet if it has already stopped. The caller records the ``cancelled`` state and
  the audit row (:func:`medzone_hub.runner.cancel_run`).
* ``slots()`` — how many runs this executor can execute at once, or ``None`` when it sets
  no limit of its own (the queue's ``RunQueue.slots`` still applies).
* ``free_gpus()`` — how many more GPU runs it could start now, or ``None`` when it queues
  GPU runs itself (Slurm waits for a ``--gres=gpu`` itself): the queue then submits a GPU
  run whenever a slot is free. A run whose template requires a GPU waits in the queue
  while this is 0.
* ``close()`` — let go of what the executor holds (threads, connections) when the worker
  stops; runs it started keep running where they can and are re-attached later.
* ``wake_fds()`` — descriptors that become readable when a run this executor started ends
  (the local executor: a pidfd per run's process), so the worker looks at the queue at
  once instead of at its next poll; ``[]`` (the default) when it has none: the worker's
  poll notices the run's end.

:func:`get_executor` makes one by name: ``local`` (:mod:`medzone_hub.executors.local`,
the default) and ``slurm`` (:mod:`medzone_hub.executors.slurm`), each imported only when
asked for; keyword arguments go to the executor's constructor, which takes at least
``config=`` (the hub's traitlets ``Config``, where it reads its own section, e.g.
``c.SlurmExecutor.partition``; ``None``: defaults) and ``sandbox_config=`` (the zone's
:class:`~medzone_hub.sandbox.SandboxConfig`; ``None``: defaults).
"""

from __future__ import annotations

import abc
import importlib

from ..errors import InvalidInput

#: States :meth:`Executor.poll` answers (or ``None``).
POLL_STATES = ("queued", "running", "done", "failed")

#: Executors by name: ``module:class``, imported when one is made.
EXECUTORS = {
    "local": "medzone_hub.executors.local:LocalExecutor",
    "slurm": "medzone_hub.executors.slurm:SlurmExecutor",
}

#: The executor runs use unless the zone's config names another (``RunQueue.executor``).
DEFAULT_EXECUTOR = "local"


class Executor(abc.ABC):
    """Executes queued runs (see the module docstring for the contract)."""

    #: Stored in ``runs.executor``; a key of :data:`EXECUTORS`.
    name: str = ""

    @abc.abstractmethod
    def submit(self, home, store, run_id: int) -> str:
        """Start executing claimed, queued run *run_id*; its job id here."""

    @abc.abstractmethod
    def poll(self, run) -> str | None:
        """``"queued"``, ``"running"``, ``"done"``, ``"failed"``, or ``None`` if unknown."""

    @abc.abstractmethod
    def cancel(self, run) -> None:
        """Stop *run*'s execution (quietly if it has stopped)."""

    def slots(self) -> int | None:
        """Runs it can execute at once; ``None``: no limit of its own."""
        return None

    def free_gpus(self) -> int | None:
        """GPU runs it could start now; ``None``: it queues GPU runs itself."""
        return None

    def close(self) -> None:
        """Let go of what it holds (runs keep running where they can)."""

    def wake_fds(self) -> list[int]:
        """Descriptors readable once a run it started ended; none by default."""
        return []


def executor_class(name: str) -> type[Executor]:
    """The :class:`Executor` subclass called *name*; :class:`InvalidInput` if none is."""
    target = EXECUTORS.get(name)
    if target is None:
        raise InvalidInput(f"no executor {name!r} (executors: {', '.join(sorted(EXECUTORS))})")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_executor(name: str = DEFAULT_EXECUTOR, **options) -> Executor:
    """An executor called *name*, made with *options*."""
    return executor_class(name)(**options)


__all__ = ["DEFAULT_EXECUTOR", "EXECUTORS", "Executor", "POLL_STATES", "executor_class",
           "get_executor"]
