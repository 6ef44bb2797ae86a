"""``python -m benchmarks [--quick] [--builds 10.0,7.2] [--only enable,discard,...]``

Runs the sections, prints the Markdown table on stdout (progress goes to stderr) and writes
``<out>/<mode>.md`` and ``<out>/<mode>.json`` (every run's value, medians, min, max, the machine).
The JSON is rewritten after each section, so an interrupted run keeps what it measured. Everything
started (QEMU processes, guests, scratch files under ``--workdir``) is removed at the end, also on
failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import commit, commit_writer, discard, enable, overhead, report, scale
from benchmarks.common import Lab, Rows, Settings, fill, machine, say
from forgeqmp.testing import installed_builds

SECTIONS = ("enable", "discard", "commit", "commit-writer", "overhead", "scale")
ROOT = Path(__file__).resolve().parent.parent


def _settings(args: argparse.Namespace) -> Settings:
    builds = installed_builds()
    if not builds:
        sys.exit("no QEMU build found: run scripts/setup-system (nox -s bench does it)")
    if args.builds:
        wanted = [b.strip() for b in args.builds.split(",") if b.strip()]
        missing = set(wanted) - {b.name for b in builds}
        if missing:
            sys.exit(
                f"QEMU {', '.join(sorted(missing))} not installed; have "
                + ", ".join(b.name for b in builds)
            )
        builds = [b for b in builds if b.name in wanted]
    elif args.quick:
        builds = builds[:1]  # the newest
    sections = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.exit(f"unknown section(s) {', '.join(sorted(unknown))}; have {', '.join(SECTIONS)}")
    quick = args.quick
    return Settings(
        quick=quick,
        runs=args.runs or (3 if quick else 5),
        builds=builds,
        sections=[s for s in SECTIONS if s in sections],
        guest_mib=[int(m) for m in args.guest_mib.split(",")]
        if args.guest_mib
        else [512]
        if quick
        else [512, 2048],
        commit_mib=[64] if quick else [256, 1024],
        commit_disks=[1, 2],
        scale_counts=[1, 4] if quick else [1, 4, 8, 16],
        scale_guest_mib=128,
        round_trips=500 if quick else 2000,
        workroot=Path(args.workdir),
    )


def _git_head() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every cleanup


def main() -> int:
    parser = argparse.ArgumentParser(description="forgeqmp benchmarks (see docs/performance.md)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes: 3 runs, small sizes, the newest QEMU only",
    )
    parser.add_argument(
        "--builds", help="QEMU builds to run on, e.g. 10.0,7.2 (default: all; --quick: the newest)"
    )
    parser.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--runs", type=int, help="runs per figure (default 5, --quick 3)")
    parser.add_argument(
        "--guest-mib",
        help="guest sizes (MiB) of enable and discard, e.g. 512,2048 (default: "
        "512,2048; --quick: 512)",
    )
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results"), help="where the .md and .json go"
    )
    parser.add_argument(
        "--workdir",
        default=os.environ.get("TMPDIR", "/tmp"),
        help="scratch space for guests, overlays and memory files",
    )
    args = parser.parse_args()
    settings = _settings(args)
    signal.signal(signal.SIGTERM, _on_sigterm)

    mode = "quick" if settings.quick else "full"
    # A partial run (--only) never overwrites the complete run's files.
    name = mode if args.only is None else f"{mode}-{'-'.join(settings.sections)}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    meta: dict[str, Any] = {
        "mode": mode,
        "quick": settings.quick,
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": settings.runs,
        "git": _git_head(),
        "argv": sys.argv[1:],
        "machine": machine(),
        "accel": "tcg",
        "builds": [{"name": b.name, "version": b.version} for b in settings.builds],
        "settings": {
            "guest_mib": settings.guest_mib,
            "touched": settings.touched,
            "commit_mib": settings.commit_mib,
            "commit_disks": settings.commit_disks,
            "scale_counts": settings.scale_counts,
            "scale_guest_mib": settings.scale_guest_mib,
            "scale_touched": settings.scale_touched,
            "round_trips": settings.round_trips,
        },
        "errors": {},
        "others_seen": 0,
    }
    sections: dict[str, Rows] = {s: Rows() for s in settings.sections}

    def save() -> str:
        meta["elapsed_s"] = time.monotonic() - started
        found = report.targets(sections)
        doc = {
            "meta": meta,
            "targets": found,
            "sections": {k: [r.as_dict() for r in v] for k, v in sections.items()},
        }
        (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        text = report.markdown(meta, sections, found)
        (out / f"{name}.md").write_text(text)
        return text

    def attempt(key: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            traceback.print_exc()
            meta["errors"][key] = f"{type(exc).__name__}: {exc}"
        lab.note_others()
        meta["others_seen"] = lab.others_seen
        save()

    say(
        f"forgeqmp benchmarks ({mode}): {', '.join(settings.sections)} on QEMU "
        + ", ".join(b.name for b in settings.builds)
    )
    with Lab(settings) as lab:
        lab.note_others()
        if {"enable", "discard"} & set(settings.sections):
            for build in settings.builds:
                for mib in settings.guest_mib:
                    key = f"guest {build.name}/{mib}"
                    try:
                        vm = lab.guest(build, mib)
                        touched = fill(vm, settings.touched)
                    except Exception as exc:
                        traceback.print_exc()
                        meta["errors"][key] = f"{type(exc).__name__}: {exc}"
                        continue
                    if "enable" in sections:
                        attempt(
                            f"enable {build.name}/{mib}",
                            enable.measure,
                            vm,
                            lab,
                            settings,
                            sections["enable"],
                            mib,
                            touched,
                        )
                    if "discard" in sections:
                        attempt(
                            f"discard {build.name}/{mib}",
                            discard.measure,
                            vm,
                            lab,
                            settings,
                            sections["discard"],
                            mib,
                        )
                    lab.drop(vm)
        for key, fn in (
            ("commit", commit.measure),
            ("commit-writer", commit_writer.measure),
            ("overhead", overhead.measure),
            ("scale", scale.measure),
        ):
            if key in sections:
                attempt(key, fn, lab, settings, sections[key])
    text = save()
    print(text)
    say(f"written: {out / (name + '.md')}, {out / (name + '.json')}")
    return 1 if meta["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
