"""Command line: ``python -m nspool demo`` and ``python -m nspool doctor``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nspool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="show workers as PID 1 and a leaked daemon being torn down")
    sub.add_parser("doctor", help="tell what this machine allows, and how to fix what it does not")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import main as demo

        return demo()
    if args.command == "doctor":
        from ._doctor import main as doctor

        return doctor()
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
