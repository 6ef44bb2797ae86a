"""The Markdown tables of a benchmark run and its targets (met or missed, and by how much).

Every cell is ``median (min–max)`` of the runs; ratios are of medians.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from benchmarks.common import Row, Rows, ratio

#: The variants the enable targets are read on: forgeqmp's own transport choice for precopy and
#: mapped-ram (not forced, hashing ahead on); each row says whether it is the build's default.
TARGET_VARIANTS = ("precopy / fdset-file", "precopy / fd", "mapped-ram / fdset-file")


def default_note(case: dict[str, object]) -> str:
    """`` (the default)`` / `` (not the default here)`` for a row that records which it is."""
    if "default" not in case:
        return ""
    return " (the default)" if case["default"] else " (not the default here)"


def cell(row: Row | None, name: str, digits: int = 2, scale: float = 1.0) -> str:
    if row is None:
        return "–"
    figure = row.figures.get(name)
    if figure is None or not figure.values:
        return "–"
    f = f"{{:.{digits}f}}"
    med = f.format(figure.median * scale)
    if len(figure.values) == 1:
        return med
    return f"{med} ({f.format(figure.min * scale)}–{f.format(figure.max * scale)})"


def times(value: Any) -> str:
    return f"{value:.2f}×" if isinstance(value, int | float) else "–"


def table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _size(row: Row) -> str:
    touched = row.case.get("touched_mib")
    return f"{row.case['guest_mib']} MiB" + (f" ({touched} touched)" if touched else "")


def enable_table(rows: Rows) -> str:
    lines = []
    for row in rows:
        c = row.case
        load = c["load"] + (
            f" ({row.extra['dirty_mb_s']} MB/s)" if "dirty_mb_s" in row.extra else ""
        )
        lines.append(
            [
                c["build"],
                _size(row),
                load,
                c["impl"],
                c["variant"] + (" (default)" if c.get("default") else ""),
                cell(row, "pause_ms", 1),
                cell(row, "stall_ms", 0),
                cell(row, "save_s"),
                cell(row, "save_gb_s"),
                cell(row, "total_s"),
                cell(row, "digest_s"),
                cell(row, "ahead_mib", 0),
                cell(row, "fsync_s"),
                cell(row, "proc_cores"),
                cell(row, "idle_cores"),
                times(row.extra.get("pause_ms_vs_raw")),
                times(row.extra.get("total_s_vs_raw")),
                times(row.extra.get("total_vs_raw_save")),
            ]
        )
    return table(
        [
            "QEMU",
            "guest",
            "load",
            "driver",
            "strategy / transport",
            "pause ms (STOP→RESUME)",
            "counter stall ms",
            "save s",
            "save GB/s",
            "enable total s",
            "digest after the save s",
            "hashed while saving MiB",
            "fsync after Active s",
            "QEMU's CPU (cores)",
            "idle CPU (cores)",
            "pause × raw",
            "total × raw",
            "total × raw save",
        ],
        lines,
    )


def discard_table(rows: Rows) -> str:
    lines = []
    for row in rows:
        c = row.case
        lines.append(
            [
                c["build"],
                f"{c['guest_mib']} MiB",
                cell(row, "memory_mib", 0),
                c["strategy"] + (" (default)" if c.get("default") else ""),
                cell(row, "forge_s"),
                cell(row, "forge_call_s"),
                cell(row, "forge_counter_s"),
                cell(row, "raw_s"),
                cell(row, "raw_counter_s"),
                f"{cell(row, 'raw_launch_s')} / {cell(row, 'raw_load_s')}",
                cell(row, "verify_s"),
                f"{cell(row, 'forge_idle_cores')} / {cell(row, 'raw_idle_cores')}",
                times(row.extra.get("forge_vs_raw")),
            ]
        )
    return table(
        [
            "QEMU",
            "guest",
            "memory file MiB",
            "saved with",
            "forgeqmp: call → running s",
            "forgeqmp: call → returned s (files removed)",
            "forgeqmp: call → restored guest's first counter line s",
            "raw: quit → running s",
            "raw: quit → first counter line s",
            "raw: launch / load s",
            "digest verify alone s",
            "idle CPU, cores: forgeqmp / raw",
            "forgeqmp × raw",
        ],
        lines,
    )


def commit_table(rows: Rows) -> str:
    lines = []
    for row in rows:
        c = row.case
        x = row.extra
        lines.append(
            [
                c["build"],
                str(c["disks"]),
                str(c["mib_per_disk"]),
                cell(row, "forge_s"),
                cell(row, "pause_ms", 1),
                cell(row, "raw_s"),
                cell(row, "qemu_img_d_s"),
                cell(row, "qemu_img_d_rm_s"),
                cell(row, "qemu_img_s"),
                cell(row, "dd_s"),
                f"{cell(row, 'qemu_cores')} / {cell(row, 'main_loop_cores')}",
                f"{cell(row, 'idle_cores')} / {cell(row, 'offline_idle_cores')}",
                times(x.get("forge_vs_raw")),
                times(x.get("forge_vs_qemu_img_d")),
                times(x.get("forge_vs_qemu_img_d_rm")),
                times(x.get("forge_vs_qemu_img")),
                times(x.get("forge_vs_dd")),
            ]
        )
    return table(
        [
            "QEMU",
            "disks",
            "MiB per disk",
            "forgeqmp live s",
            "forgeqmp switch pause ms (longest disk)",
            "raw live s",
            "qemu-img commit -d s",
            "qemu-img commit -d, then rm of the overlay s",
            "qemu-img commit s",
            "dd s",
            "QEMU's CPU during forgeqmp's commit, cores: all threads / main loop",
            "idle CPU, cores: forgeqmp / qemu-img -d",
            "× raw",
            "× qemu-img -d",
            "× qemu-img -d + rm",
            "× qemu-img",
            "× dd",
        ],
        lines,
    )


def overhead_table(rows: Rows) -> str:
    lines = []
    for row in rows:
        what = row.case["what"]
        if "round trip" in what:
            lines.append(
                [
                    what,
                    cell(row, "forgeqmp_us", 0) + " µs",
                    cell(row, "raw_us", 0) + " µs",
                    "–",
                    times(row.extra.get("forge_vs_raw")),
                ]
            )
            for key, label in (
                ("raw_deadline_us", "anyio.fail_after"),
                ("raw_lock_us", "anyio.Lock"),
            ):
                if key not in row.figures:
                    continue
                lines.append(
                    [
                        f"… bare qemu.qmp + only the {label} forgeqmp adds per command",
                        "–",
                        cell(row, key, 0) + " µs",
                        "–",
                        times(ratio(row.median(key), row.median("raw_us"))),
                    ]
                )
            for key, label in (
                ("layer_lock_us", "anyio.Lock()"),
                ("layer_fast_lock_us", "anyio.Lock(fast_acquire=True)"),
                ("layer_fail_after_us", "anyio.fail_after()"),
                ("layer_asyncio_timeout_us", "asyncio.timeout()"),
                ("layer_shared_deadline_us", "the connection's shared deadline (forgeqmp's)"),
            ):
                if key not in row.figures:
                    continue
                lines.append(
                    [f"… {label} around nothing, per use", cell(row, key, 1) + " µs", "–", "–", "–"]
                )
        elif "probe" in what:
            lines.append([what, cell(row, "forgeqmp_ms", 1) + " ms", "–", "–", "–"])
        else:
            lines.append(
                [
                    what,
                    cell(row, "forgeqmp_mib", 1) + " MiB",
                    cell(row, "raw_mib", 1) + " MiB",
                    cell(row, "floor_mib", 1) + " MiB",
                    times(row.extra.get("forge_vs_raw")),
                ]
            )
    return table(
        ["what", "forgeqmp", "raw (bare qemu.qmp)", "interpreter + qemu.qmp", "forgeqmp × raw"],
        lines,
    )


def scale_table(rows: Rows) -> str:
    lines = []
    for row in rows:
        c = row.case
        one = row.extra.get("sum_of_single_s")
        lines.append(
            [
                c["build"],
                f"{c['guest_mib']} MiB ({c['touched_mib']} touched)",
                c["cycle"],
                str(c["instances"]),
                cell(row, "wall_s"),
                f"{one:.2f}" if one else "–",
                times(row.extra.get("vs_sum_of_single")),
                cell(row, "slowest_enable_s"),
                cell(row, "peak_rss_mib", 0),
            ]
        )
    return table(
        [
            "QEMU",
            "guest",
            "cycle",
            "instances",
            "wall s (all at once)",
            "sum of single runs s",
            "wall / sum",
            "slowest enable s",
            "controller peak RSS MiB",
        ],
        lines,
    )


# --- targets -------------------------------------------------------------------------------------


def _verdict(value: float | None, limit: float, *, at_most: bool, unit: str, digits: int) -> str:
    if value is None:
        return "not measured"
    f = f"{{:.{digits}f}}"
    gap = abs(value - limit)
    if (value <= limit) if at_most else (value >= limit):
        return f"**met** ({f.format(gap)} {unit} of margin)"
    factor = value / limit if at_most else limit / value if value else float("inf")
    return f"**missed** by {f.format(gap)} {unit} ({factor:.2f}× the target)"


def targets(sections: dict[str, Rows]) -> list[dict[str, Any]]:
    """Each target once per relevant case: what was measured, against what, met or missed."""
    found: list[dict[str, Any]] = []

    def add(
        target: str,
        case: str,
        value: float | None,
        limit: float,
        *,
        at_most: bool,
        unit: str,
        digits: int,
        shown: Callable[[float], str],
    ) -> None:
        found.append(
            {
                "target": target,
                "case": case,
                "value": value,
                "limit": limit,
                "measured": shown(value) if value is not None else "–",
                "verdict": _verdict(value, limit, at_most=at_most, unit=unit, digits=digits),
                "met": None if value is None else (value <= limit if at_most else value >= limit),
            }
        )

    enable = sections.get("enable")
    if enable is not None:
        biggest = max((r.case["guest_mib"] for r in enable), default=0)
        for row in enable:
            c = row.case
            if c["impl"] != "forgeqmp" or c["guest_mib"] != biggest:
                continue
            if c["variant"] not in TARGET_VARIANTS or c["load"] not in ("idle", "dirtying"):
                continue  # the first save of a QEMU is a row of its own, not a target case
            case = (
                f"QEMU {c['build']}, {biggest} MiB guest, {c['load']}, {c['variant']}"
                + default_note(c)
            )
            add(
                "guest pause at 2 GiB ≤ 30 ms",
                case,
                row.median("pause_ms"),
                30,
                at_most=True,
                unit="ms",
                digits=1,
                shown=lambda v: f"{v:.1f} ms",
            )
            save, total = row.median("save_s"), row.median("total_s")
            alone = row.extra.get("total_vs_raw_save")
            add(
                "enable total (save + digest; Active waits for no fsync) ≤ 1.2× the save alone "
                "(the raw recipe's save in the same run)",
                f"{case}; total {cell(row, 'total_s')} s; its save {cell(row, 'save_s')} s "
                f"({times(ratio(total, save))} of it), digest after the save "
                f"{cell(row, 'digest_s')} s; the fsync it no longer waits for, measured after "
                f"it: {cell(row, 'fsync_s')} s",
                alone if alone is not None else ratio(total, save),
                1.2,
                at_most=True,
                unit="×",
                digits=2,
                shown=lambda v: f"{v:.2f}×",
            )
            add(
                "memory save ≥ 2 GB/s",
                case,
                row.median("save_gb_s"),
                2.0,
                at_most=False,
                unit="GB/s",
                digits=2,
                shown=lambda v: f"{v:.2f} GB/s",
            )
    commit = sections.get("commit")
    if commit is not None:
        for row in commit:
            c = row.case
            case = (
                f"QEMU {c['build']}, {c['disks']} disk(s) × {c['mib_per_disk']} MiB; "
                f"{cell(row, 'forge_s')} s vs {cell(row, 'qemu_img_d_rm_s')} s; vs plain "
                f"qemu-img commit: {times(row.extra.get('forge_vs_qemu_img'))}, vs -d alone "
                f"(overlay kept): {times(row.extra.get('forge_vs_qemu_img_d'))}"
            )
            add(
                "commit ≤ 1.3× offline qemu-img commit (-d, then rm of the overlay: the same "
                "work as forgeqmp's)",
                case,
                row.extra.get("forge_vs_qemu_img_d_rm"),
                1.3,
                at_most=True,
                unit="×",
                digits=2,
                shown=lambda v: f"{v:.2f}×",
            )
    discard = sections.get("discard")
    if discard is not None:
        biggest = max((r.case["guest_mib"] for r in discard), default=0)
        for row in discard:
            c = row.case
            if c["guest_mib"] != biggest:
                continue
            case = (
                f"QEMU {c['build']}, {biggest} MiB guest, saved with {c['strategy']}"
                + default_note(c)
            )
            add(
                "discard of 2 GiB ≤ 0.5 s to running",
                case,
                row.median("forge_s"),
                0.5,
                at_most=True,
                unit="s",
                digits=2,
                shown=lambda v: f"{v:.2f} s",
            )
    overhead = sections.get("overhead")
    if overhead is not None:
        for row in overhead:
            if "round trip" in row.case["what"]:
                r = row.extra.get("forge_vs_raw")
                add(
                    "library overhead ≤ 5 % (QMP round trip vs bare qemu.qmp)",
                    f"QEMU {row.case['build']}, {row.case['what']}",
                    (r - 1) * 100 if r else None,
                    5.0,
                    at_most=True,
                    unit="%",
                    digits=1,
                    shown=lambda v: f"{v:+.1f} %",
                )
    return found


def targets_table(found: Sequence[dict[str, Any]]) -> str:
    return table(
        ["target", "case", "measured (median)", "verdict"],
        [[t["target"], t["case"], t["measured"], t["verdict"]] for t in found],
    )


def commit_writer_table(rows: Rows) -> str:
    return table(
        [
            "QEMU",
            "MiB",
            "copy",
            "commit s",
            "switch pause ms",
            "longest guest stall ms",
            "guest rewrote MiB",
            "first bound to merged s",
        ],
        [
            [
                row.case["build"],
                str(row.case["mib_per_disk"]),
                f"slowed to {row.case['copy_mib_s']} MiB/s" if "copy_mib_s" in row.case else "full",
                cell(row, "forge_s"),
                cell(row, "pause_ms", 1),
                cell(row, "stall_ms", 0),
                cell(row, "rewritten_mib", 0),
                cell(row, "bounded_s") if "copy_mib_s" in row.case else "",
            ]
            for row in rows
        ],
    )


RENDERERS: dict[str, tuple[str, Callable[[Rows], str]]] = {
    "enable": ("Enable", enable_table),
    "discard": ("Discard", discard_table),
    "commit": ("Commit", commit_table),
    "commit-writer": ("Commit while the guest rewrites its disk", commit_writer_table),
    "overhead": ("Library overhead", overhead_table),
    "scale": ("Scale", scale_table),
}


def markdown(
    meta: dict[str, Any], sections: dict[str, Rows], found: Sequence[dict[str, Any]]
) -> str:
    m = meta["machine"]
    builds = ", ".join(f"{b['name']} ({b['version']})" for b in meta["builds"])
    parts = [
        f"# forgeqmp benchmarks ({meta['mode']}, {meta['started']})",
        "",
        f"{m['cpus']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, kernel {m['kernel']}, Python "
        f"{m['python']}; QEMU {builds}; TCG. Each cell: median (min–max) of {meta['runs']} runs"
        + (" (quick mode: fewer runs and smaller sizes than the full run)" if meta["quick"] else "")
        + f". Other QEMU processes seen on the machine during the run: up to "
        f"{meta['others_seen']}. Took {meta['elapsed_s'] / 60:.1f} min.",
    ]
    if found:
        parts += ["", "## Targets", "", targets_table(found)]
    for key, rows in sections.items():
        title, render = RENDERERS[key]
        parts += ["", f"## {title}", "", render(rows)]
    for key, error in meta.get("errors", {}).items():
        parts += ["", f"**Section {key} failed:** `{error}`"]
    return "\n".join(parts) + "\n"
