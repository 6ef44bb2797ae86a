"""Real QEMU for tests: the test guest, the instance harness, the installed builds, and a pytest
plugin (fixtures ``qemu_build``, ``qemu_instance``, ``qemu_factory``)."""

from forgeqmp.testing.builds import QemuBuild, installed_builds
from forgeqmp.testing.guest import GuestImage, guest_image, pattern_md5
from forgeqmp.testing.instance import DiskImage, DiskSpec, GuestCommandError, QemuInstance

__all__ = [
    "DiskImage",
    "DiskSpec",
    "GuestCommandError",
    "GuestImage",
    "QemuBuild",
    "QemuInstance",
    "guest_image",
    "installed_builds",
    "pattern_md5",
]
