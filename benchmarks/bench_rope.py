"""Rotary embedding benchmark; the same as ``fastlm-bench --ops rope [--suite ...]``.

The cases live in fastlm/bench/rope.py, so fastlm-bench and this script share them.
"""

import sys

from fastlm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "rope", *sys.argv[1:]]))
