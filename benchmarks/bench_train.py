"""Training step benchmark; the same as ``fastlm-bench --ops train [--suite ...]``.

The cases live in fastlm/bench/train.py, so fastlm-bench and this script share them.
"""

import sys

from fastlm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "train", *sys.argv[1:]]))
