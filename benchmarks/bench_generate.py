"""Greedy generation benchmark (fastlm.generate's KV-cache loop vs transformers' generate on the
same weights); the same as ``fastlm-bench --ops generate [--suite ...]``.

The cases live in fastlm/bench/generate.py, so fastlm-bench and this script share them.
"""

import sys

from fastlm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "generate", *sys.argv[1:]]))
