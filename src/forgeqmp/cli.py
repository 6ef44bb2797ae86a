"""The ``forgeqmp`` command line (its contract: shared/design/cli-contract.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from forgeqmp._version import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="forgeqmp",
        description="Try-before-you-keep live snapshots (disks + memory) of a running QEMU VM.",
    )
    parser.add_argument("--version", action="version", version=f"forgeqmp {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code of the contract."""
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help(sys.stderr)
    return 2
