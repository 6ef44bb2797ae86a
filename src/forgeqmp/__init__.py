"""forgeqmp: try-before-you-keep live snapshots of running QEMU VMs, with full memory state."""

from forgeqmp._version import __version__

__all__ = ["__version__"]
