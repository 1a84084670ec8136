"""fastlm.ops.linear (oneDNN on CPU) vs F.linear; the same as ``fastlm-bench --ops gemm [--suite ...]``.

The cases live in fastlm/bench/gemm.py, so fastlm-bench and this script share them.
"""

import sys

from fastlm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "gemm", *sys.argv[1:]]))
