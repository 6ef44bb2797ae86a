"""``python -m benchmarks.hostmem [--mib 2048] [--rest 10] [--runs 3]``: what fresh memory costs on
this machine (no QEMU needed).

A restore starts a new QEMU whose guest RAM is new anonymous memory, touched page by page while
the memory state loads; a save writes the memory file into new page-cache pages. On a machine
that is itself a VM, a page of it the hypervisor does not back yet (never used, or handed back
by the balloon's free page reporting) costs a hypervisor fault on first touch. This measures
touching ``--mib`` MiB of new anonymous memory (transparent huge pages, as QEMU asks for its
RAM, and 4 KiB pages) three ways: right after the same amount was freed (its pages are still
backed), after ``--rest`` seconds of rest (free page reporting may have handed them back), and
a second touch of memory already touched (the loop's own cost). It also prints whether the
balloon reports free pages (``VIRTIO_BALLOON_F_REPORTING``). Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import sys
import time
from pathlib import Path

MIB = 1 << 20
PAGE = 4096
_BALLOON_DEVICE_ID = "0x0005"
_REPORTING_FEATURE_BIT = 5  # VIRTIO_BALLOON_F_REPORTING


def _touch(mib: int, *, huge: bool, again: bool = False) -> float:
    """Seconds to write one byte per 4 KiB page of ``mib`` MiB of new anonymous memory (or, with
    ``again``, of memory touched once before the timing)."""
    area = mmap.mmap(-1, mib * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if huge:
            area.madvise(mmap.MADV_HUGEPAGE)
        if again:
            for offset in range(0, mib * MIB, PAGE):
                area[offset] = 1
        started = time.monotonic()
        for offset in range(0, mib * MIB, PAGE):
            area[offset] = 2
        return time.monotonic() - started
    finally:
        area.close()


def balloon_reports_free_pages() -> bool | None:
    """True if a virtio balloon with free page reporting is present, None if there is none."""
    for device in Path("/sys/bus/virtio/devices").glob("*"):
        try:
            if (device / "device").read_text().strip() != _BALLOON_DEVICE_ID:
                continue
            features = (device / "features").read_text().strip()
        except OSError:
            continue
        return len(features) > _REPORTING_FEATURE_BIT and features[_REPORTING_FEATURE_BIT] == "1"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=2048)
    parser.add_argument("--rest", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    rows: list[tuple[str, list[float]]] = []
    for huge in (True, False):
        kind = "huge pages" if huge else "4 KiB pages"
        after_free, after_rest, resident = [], [], []
        for _ in range(args.runs):
            _touch(args.mib, huge=huge)  # frees its pages: the next touch can reuse them
            after_free.append(_touch(args.mib, huge=huge))
            time.sleep(args.rest)
            after_rest.append(_touch(args.mib, huge=huge))
            resident.append(_touch(args.mib, huge=huge, again=True))
        rows += [
            (f"{kind}, right after the same amount was freed", after_free),
            (f"{kind}, after {args.rest:g} s of rest", after_rest),
            (f"{kind}, memory already touched (the loop alone)", resident),
        ]
    print(f"free page reporting of the balloon: {balloon_reports_free_pages()}")
    print()
    print(f"| touching {args.mib} MiB of new memory | median s | min s | max s |")
    print("|---|---|---|---|")
    for label, values in rows:
        print(
            f"| {label} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
