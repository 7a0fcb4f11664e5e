"""The ``engram`` command: ``engram serve``, ``engram loadgen``, ``engram tenant ...``.

Each area registers its own sub-commands; this module only assembles them.
"""

from __future__ import annotations

import argparse
import sys

from engram import __version__
from engram.server.cli import add_parser as add_service_commands
from engram.tenancy.cli import add_parser as add_tenant_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description="Engram: LlamaIndex chat memory that survives scaling.")
    parser.add_argument("--version", action="version", version=f"engram {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_service_commands(subparsers)
    add_tenant_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
