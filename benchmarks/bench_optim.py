"""Optimizer step benchmark; the same as ``fastlm-bench --ops optim [--suite ...]``.

The cases live in fastlm/bench/optim.py, so fastlm-bench and this script share them.
"""

import sys

from fastlm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "optim", *sys.argv[1:]]))
