"""The `mqinfer` command."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from mqinfer import accounts, artifacts, demo, deploy, infer, keys, split
from mqinfer.cli import broker, coordinator, node


def _version() -> str:
    """The installed package's version, from its metadata (pyproject.toml's `version`)."""
    try:
        return version("mqinfer")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mqinfer",
        description="Discover, provision and orchestrate ML inference on edge nodes over MQTT. "
        "Every command takes --help.",
    )
    p.add_argument("--version", action="version", version=f"mqinfer {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    broker.add_parser(sub)
    node.add_parser(sub)
    coordinator.add_parsers(sub)
    deploy.add_parsers(sub)
    infer.add_parser(sub)
    split.add_parser(sub)
    keys.add_parser(sub)
    demo.add_parser(sub)
    accounts.add_parser(sub)
    artifacts.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
