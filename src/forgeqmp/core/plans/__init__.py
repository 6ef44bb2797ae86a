"""The QMP plans of each Forge step, as pure data (sans-IO).

A plan says which QMP commands a step sends, with which arguments, and which events or replies it
waits for; the driver (:mod:`forgeqmp.forge`) only executes it. Plans are computed by pure functions
from frozen inputs, so the whole enable/commit/discard logic is unit-testable without QEMU.
"""

from forgeqmp.core.plans.command import Command

__all__ = ["Command"]
