"""Llama-style training step, transformers with SDPA vs the same model after ``fastlm.patch_hf``; the
same as ``fastlm-bench --ops hf [--suite ...]`` (skipped when transformers is not installed).

The cases live in fastlm/bench/hf.py, so fastlm-bench and this script share them.
"""

import sys

from fastlm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "hf", *sys.argv[1:]]))
