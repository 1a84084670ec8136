"""The tiny training step with gemm's C++ transpose against oneDNN's own copy of a transposed left
operand (torch's strided copy inside ``mkldnn::_linear_pointwise``), alternating steps in one process
so that the machine's drift cancels. The evidence for ``fastlm.ops.gemm._row_major``.

    PYTHONPATH=. python benchmarks/gemm_transpose_ab.py [STEPS]

Prints the median step time of each over STEPS alternating steps (default 80), fp32, both threads.
"""

import importlib

from benchmarks.plain_process_ab import train_steps
from fastlm.bench.harness import ab_count, alternating_medians

gemm = importlib.import_module("fastlm.ops.gemm")  # the module, not the function fastlm.ops exports


def main(argv: list[str] | None = None) -> None:
    steps = ab_count(__doc__, argv, "STEPS", 80, "steps")
    step = train_steps("fastlm")["fastlm"]
    fast = gemm._row_major

    def with_row_major(row_major):
        def run():
            gemm._row_major = row_major
            step()
        return run

    runs = {"C++ transpose": with_row_major(fast), "oneDNN's own copy": with_row_major(lambda t: t)}
    for run in runs.values():
        for _ in range(3):
            run()
    ms = alternating_medians(runs, steps)
    gemm._row_major = fast
    print("  ".join(f"{name} {m:.1f} ms" for name, m in ms.items()))


if __name__ == "__main__":
    main()
