"""Training-step A/B in plain processes (default allocator): fastlm against transformers.

    python benchmarks/plain_process_ab.py train [--steps N]              # alternating steps in one process
    python benchmarks/plain_process_ab.py train --solo PAIRS [--steps N] # PAIRS x (one process per model)
    python benchmarks/plain_process_ab.py hf-full ...                    # 4x512 Llama: patch_hf vs unpatched (SDPA)
    python benchmarks/plain_process_ab.py hf-quick ...                   # 2x128 Llama: the same at the quick size

``train``: the tiny preset at 16x128, fastlm's model vs LlamaForCausalLM of the same dims, fused AdamW.
Alternating steps in one process cancel the machine's drift, but each step then starts on the caches
and heap the other model left (transformers' step measured ~10% slower so than alone). ``--solo``
runs each model alone in its own process, N steps after warm-up, alternating processes PAIRS times: a
training run's conditions; it prints each process's median and the median of those per model.

Each model's line also gives its median minor page faults per step. glibc's malloc returns freed memory
to the OS and faults it back in later, which costs whichever step touches it first: alternating, that is
transformers' step (fastlm's reuses what transformers' just freed); alone, fastlm's faults more. With
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296`` (keep
freed memory) neither faults, and the two steps compare as computation alone
(``benchmarks/results/cpu-2026-12-03-zen4/``).
"""

import argparse
import copy
import json
import resource
import subprocess
import sys

import torch


def train_steps(only: str | None = None) -> dict:
    from fastlm.bench.train import SIZES, step_fn, transformers_model
    from fastlm.models import Transformer
    from fastlm.train.config import resolve

    preset, batch, seq, vocab = SIZES["full-cpu"]
    cfg = resolve(preset, None, []).model.replace(vocab_size=vocab)
    inputs = torch.randint(0, vocab, (batch, seq))
    targets = torch.roll(inputs, -1, dims=1)
    cpu = torch.device("cpu")
    steps = {}
    if only in (None, "fastlm"):
        model = Transformer(cfg)
        steps["fastlm"] = step_fn(model, lambda: model(inputs, targets), cpu)
    if only in (None, "transformers"):
        hf = transformers_model(cfg)
        steps["transformers"] = step_fn(hf, lambda: hf(input_ids=inputs, labels=inputs).loss, cpu)
    return steps


def hf_steps(suite: str, only: str | None = None) -> dict:
    import fastlm.hf
    from fastlm.bench.hf import SIZES, _model

    dims, dtype = SIZES[suite]
    base = _model(dims, dtype, torch.device("cpu"))
    patched = copy.deepcopy(base)
    fastlm.hf.patch_hf(patched)
    ids = torch.randint(0, dims[5], (dims[6], dims[7]))

    def step_of(model):
        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            for p in model.parameters():
                p.grad = None
        return step

    steps = {"fastlm-patched": step_of(patched), "transformers": step_of(base)}
    return {name: step for name, step in steps.items() if only in (None, name)}


def counting_faults(steps: dict) -> tuple[dict, dict]:
    """The steps, each wrapped to record its minor page faults (this process's) per call."""
    faults = {name: [] for name in steps}

    def counted(name, step):
        def run():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            step()
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return run

    return {name: counted(name, step) for name, step in steps.items()}, faults


def run_steps(which: str, n: int, only: str | None = None) -> dict:
    """{model: [median ms, median minor page faults]} over n steps (alternating when both models run)
    after two warm-up steps each."""
    from fastlm.bench.harness import alternating_medians

    torch.manual_seed(0)
    steps = train_steps(only) if which == "train" else hf_steps(which.removeprefix("hf-"), only)
    steps, faults = counting_faults(steps)
    medians = alternating_medians(steps, n, warmup=2)
    return {name: [ms, sorted(faults[name][-n:])[n // 2]] for name, ms in medians.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["train", "hf-full", "hf-quick"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--solo", type=int, default=0, help="pairs of single-model processes (0: one process, alternating)")
    p.add_argument("--only", help=argparse.SUPPRESS)  # a --solo child: this model alone
    args = p.parse_args()
    if args.only:
        print(json.dumps(run_steps(args.which, args.steps, args.only)))
        return
    if not args.solo:
        median = run_steps(args.which, args.steps)
        how = f"{args.steps} alternating steps"
    else:
        names = ["fastlm" if args.which == "train" else "fastlm-patched", "transformers"]
        runs = {name: [] for name in names}
        for _ in range(args.solo):
            for name in names:
                out = subprocess.run([sys.executable, __file__, args.which, "--steps", str(args.steps), "--only", name],
                                     capture_output=True, text=True, check=True).stdout
                runs[name].append(json.loads(out.splitlines()[-1])[name])
        for name, per_process in runs.items():
            print(f"{args.which} {name}: per-process medians " + ", ".join(f"{m:.1f}" for m, _ in per_process) + " ms")
        median = {name: sorted(per_process)[len(per_process) // 2] for name, per_process in runs.items()}
        how = f"{args.solo} processes of {args.steps} steps each"
    for name, (ms, faults) in median.items():
        print(f"{args.which} {name}: median {ms:.1f} ms, {faults} minor page faults per step ({how})")
    ours = next(name for name in median if name.startswith("fastlm"))
    print(f"{args.which}: fastlm is {median['transformers'][0] / median[ours][0]:.3f}x transformers' speed")


if __name__ == "__main__":
    main()
