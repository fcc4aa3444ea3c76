"""Command-line plumbing shared by train.py and sweep.py."""

from __future__ import annotations

import argparse
import os


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (the usage is in --help), exit status 2; under
    torchrun from rank 0 alone (every rank parses the same arguments and exits alike)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n" if os.environ.get("RANK", "0") == "0" else None)
