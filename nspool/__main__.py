"""Command line of nspool: python -m nspool demo | doctor | bench, and --version."""

from __future__ import annotations

import argparse
import sys

# Plain text on purpose: argparse prints these as they are.
DESCRIPTION = (
    "nspool: a process pool whose workers each live in their own PID namespace, so nothing a "
    "task starts can outlive it."
)
BENCH_DESCRIPTION = """\
Measure, on this machine, what nspool's isolation costs: worker spawn time (plain fork
against fork into a new PID namespace, and with a private /proc), round trip and throughput
of NSPoolExecutor beside concurrent.futures.ProcessPoolExecutor (forkserver), and how fast a
task's process tree is gone once the task returns. Takes about a minute (a few seconds with
--quick), prints a table, and exits with status 0 when every figure was measured and nothing
was left running, 1 otherwise."""


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="python -m nspool", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"nspool {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    demo = "show isolated workers and a leaked daemon being torn down"
    sub.add_parser("demo", help=demo, description=demo[0].upper() + demo[1:] + ".")
    doctor = "tell what this machine allows, and how to fix what it does not"
    sub.add_parser("doctor", help=doctor, description=doctor[0].upper() + doctor[1:] + ".")
    bench = sub.add_parser(
        "bench",
        help="measure what isolation costs here (about a minute)",
        description=BENCH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of the table (keys: see the nspool._tools.bench module "
        "docstring); progress lines still go to stderr",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="tiny counts and 2 repeats: a few seconds, a smoke test rather than a measurement",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # No command asks what there is (as `pip` alone does): the help, and success.
        parser.print_help()
        return 0
    if args.command == "demo":
        from ._tools.demo import main as demo

        return demo()
    if args.command == "doctor":
        from ._tools.doctor import main as doctor

        return doctor()
    if args.command == "bench":
        from ._tools.bench import run

        return run(quick=args.quick, as_json=args.json)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
