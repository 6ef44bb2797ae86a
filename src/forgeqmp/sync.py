"""A blocking facade over the async API, for scripts that do not run an event loop.

::

    import forgeqmp.sync

    with forgeqmp.sync.connect("/run/vm1/qmp.sock") as vm:
        session = vm.enable()
        ...
        vm.discard()

Each :class:`SyncInstance` runs its own asyncio event loop in a background thread (an anyio
blocking portal) and forwards every call to the :class:`~forgeqmp.forge.Instance` living there,
so the semantics (locks, deadlines, records, errors) are exactly those of the async API.
Callbacks (``on_progress``, :meth:`SyncInstance.follow`) run in that background thread.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Concatenate, ParamSpec, TypeVar

import anyio.from_thread

from forgeqmp.adapters.launcher import Launcher
from forgeqmp.adapters.qmp import DEFAULT_CONNECT_TIMEOUT
from forgeqmp.core.disks import Disk
from forgeqmp.core.features import Features
from forgeqmp.core.record import SessionRecord
from forgeqmp.forge import Instance, StateListener
from forgeqmp.forge import connect as _connect

__all__ = ["SyncInstance", "connect"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _blocking(
    method: Callable[Concatenate[Instance, _P], Awaitable[_R]],
) -> Callable[Concatenate[SyncInstance, _P], _R]:
    """Turn an ``Instance`` coroutine method into a blocking ``SyncInstance`` method."""

    def call(self: SyncInstance, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return self.portal.call(functools.partial(method, self.instance, *args, **kwargs))

    # The real signature (inspect and the docs follow __wrapped__), under this class's name.
    functools.update_wrapper(call, method)
    call.__qualname__ = f"SyncInstance.{method.__name__}"
    return call


class SyncInstance:
    """The blocking twin of :class:`~forgeqmp.forge.Instance`; get one from :func:`connect`."""

    def __init__(self, instance: Instance, portal: anyio.from_thread.BlockingPortal) -> None:
        self.instance = instance
        self.portal = portal

    enable = _blocking(Instance.enable)
    commit = _blocking(Instance.commit)
    discard = _blocking(Instance.discard)
    recover = _blocking(Instance.recover)
    runstate = _blocking(Instance.runstate)

    def features(self) -> Features:
        """What this QEMU supports (see :meth:`forgeqmp.forge.Instance.features`)."""
        return self.portal.call(self.instance.features)

    def disks(self) -> tuple[Disk, ...]:
        """The VM's disk devices (see :meth:`forgeqmp.forge.Instance.disks`)."""
        return self.portal.call(self.instance.disks)

    def session(self) -> SessionRecord | None:
        """The current session record, or None."""
        return self.instance.session()

    def follow(self, listener: StateListener) -> Callable[[], None]:
        """See :meth:`forgeqmp.forge.Instance.follow`; the listener runs in the portal's thread."""
        return self.instance.follow(listener)


@contextlib.contextmanager
def connect(
    qmp_socket: str | os.PathLike[str],
    *,
    state_dir: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    allow_offline: bool = False,
    launcher: Launcher | None = None,
) -> Iterator[SyncInstance]:
    """Blocking :func:`forgeqmp.connect`: the same arguments, the same errors."""
    with (
        anyio.from_thread.start_blocking_portal(backend="asyncio") as portal,
        portal.wrap_async_context_manager(
            _connect(
                qmp_socket,
                state_dir=state_dir,
                timeout=timeout,
                allow_offline=allow_offline,
                launcher=launcher,
            )
        ) as instance,
    ):
        yield SyncInstance(instance, portal)
