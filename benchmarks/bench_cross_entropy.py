"""Cross-entropy / linear cross-entropy benchmark; the same as ``fastlm-bench --ops cross_entropy [--suite ...]``.

The cases live in fastlm/bench/cross_entropy.py, so fastlm-bench and this script share them.
"""

import sys

from fastlm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "cross_entropy", *sys.argv[1:]]))
