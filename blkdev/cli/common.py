"""What every subcommand shares: the program name, usage errors, sizes, logging options."""

from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn

from blkdev.cli.logging_setup import LOG_LEVELS

EXIT_USAGE = 2
PROG = "vhost-user-blk"

_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class UsageError(Exception):
    """The user asked for something that cannot work; the message says what to do instead."""


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``4096``, ``1.5G`` -> bytes (binary units, like qemu-img)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 4096, 512M, 10G)")
    return int(float(match.group(1)) * _SIZE_SUFFIXES[match.group(2).lower()])


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to read more), exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see: {self.prog} --help)")


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")


def fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)
