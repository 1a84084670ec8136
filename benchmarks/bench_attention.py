"""Attention benchmark; the same as ``fastlm-bench --ops attention [--suite ...]``.

The cases live in fastlm/bench/attention.py, so fastlm-bench and this script share them.
"""

import sys

from fastlm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "attention", *sys.argv[1:]]))
