"""The command line: ``main`` (parser and dispatch), one module per subcommand, logging set-up."""

from blkdev.cli.main import main

__all__ = ["main"]
