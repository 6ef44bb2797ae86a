"""Scale: 1, 4, 8, 16 instances (small guests) forged at once by one controller process:
enable + commit, and enable + discard, on every instance concurrently. The wall time of the whole
is compared with the sum of single runs (N x the median of the one-instance runs): below 1, running
them together is faster than one after another."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import Lab, Rows, Settings, fill, ratio, say
from benchmarks.overhead import controller
from forgeqmp.testing import QemuInstance


def measure(lab: Lab, settings: Settings, rows: Rows) -> None:
    build = settings.newest
    most = max(settings.scale_counts)
    mib = settings.scale_guest_mib
    vms: list[QemuInstance] = [lab.guest(build, mib, start=False) for _ in range(most)]
    say(f"  scale: QEMU {build.name}, booting {most} guests of {mib} MiB")
    with ThreadPoolExecutor(most) as pool:
        list(pool.map(lambda vm: vm.start(timeout=600), vms))
        touched = max(pool.map(lambda vm: fill(vm, settings.scale_touched), vms))
    try:
        for cycle in ("commit", "discard"):
            for run in range(settings.runs):
                for n in settings.scale_counts:
                    sockets = [vm.qmp_socket for vm in vms[:n]]
                    got = controller(vms[0], lab, "forgeqmp", *sockets, cycle=cycle)
                    row = rows.get(build=build.name, cycle=f"enable + {cycle}", instances=n)
                    row.case.update(guest_mib=mib, touched_mib=touched)
                    row.add("wall_s", got["wall_s"])
                    row.add("slowest_enable_s", max(i["enable_s"] for i in got["instances"]))
                    row.add("peak_rss_mib", got["peak_rss_mib"])
                    say(
                        f"    enable + {cycle:7} x{n:2} run {run + 1}: {got['wall_s']:.2f} s, "
                        f"controller RSS {got['peak_rss_mib']:.0f} MiB"
                    )
            single = rows.find(build=build.name, cycle=f"enable + {cycle}", instances=1)
            for row in rows:
                if row.case["cycle"] != f"enable + {cycle}" or single is None:
                    continue
                one = single.median("wall_s")
                n = row.case["instances"]
                row.extra["sum_of_single_s"] = round(n * one, 3) if one else None
                r = ratio(row.median("wall_s"), n * one if one else None)
                row.extra["vs_sum_of_single"] = round(r, 3) if r else None
    finally:
        for vm in vms:
            lab.drop(vm)
