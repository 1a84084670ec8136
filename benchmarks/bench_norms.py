"""LayerNorm / RMSNorm benchmark; the same as ``fastlm-bench --ops norm [--suite ...]``.

The cases live in fastlm/bench/norms.py, so fastlm-bench and this script share them.
"""

import sys

from fastlm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "norm", *sys.argv[1:]]))
