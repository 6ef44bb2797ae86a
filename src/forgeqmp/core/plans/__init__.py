"""The QMP plans of each Forge step, as pure data (sans-IO).

A plan says which QMP commands a step sends, with which arguments, and which events or replies it
waits for; the operations (:mod:`forgeqmp.ops`) only execute it, each command through one helper
(:func:`forgeqmp.ops.context.send`). Plans are computed by pure functions from frozen inputs (the
record, the disks, the features QEMU has), so that the enable, commit, discard and recover logic
is unit-testable without QEMU: :mod:`~forgeqmp.core.plans.enable`,
:mod:`~forgeqmp.core.plans.commit`, :mod:`~forgeqmp.core.plans.discard`,
:mod:`~forgeqmp.core.plans.recover`, and :mod:`~forgeqmp.core.plans.common` for the commands
several of them send (the read-only queries included).
"""

from forgeqmp.core.plans.command import Command

__all__ = ["Command"]
