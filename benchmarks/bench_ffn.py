"""SwiGLU / GeGLU and MLP benchmark; the same as ``fastlm-bench --ops ffn [--suite ...]``.

The cases live in fastlm/bench/ffn.py, so fastlm-bench and this script share them.
"""

import sys

from fastlm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "ffn", *sys.argv[1:]]))
