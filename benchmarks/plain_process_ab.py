"""Training-step A/B in a plain process: fastlm against transformers, alternating steps, glibc's
default allocator (fastlm-bench fixes the mmap threshold for its CPU peak-memory figures, which
charges page faults to every large allocation; this script shows the step times a training run sees).

    python benchmarks/plain_process_ab.py train [STEPS]       # tiny preset 16x128: fastlm model vs LlamaForCausalLM
    python benchmarks/plain_process_ab.py hf-full [STEPS]     # 4x512 Llama: fastlm.patch_hf vs unpatched (SDPA)
    python benchmarks/plain_process_ab.py hf-quick [STEPS]    # 2x128 Llama: the same at the quick suite's size

Prints the median step time of each over STEPS alternating steps (after two warm-up steps each) and the ratio.
"""

import copy
import sys
import time

import torch


def train_steps() -> dict:
    from fastlm.bench.train import SIZES, step_fn, transformers_model
    from fastlm.models import Transformer
    from fastlm.train.config import resolve

    preset, batch, seq, vocab = SIZES["full-cpu"]
    cfg = resolve(preset, None, []).model.replace(vocab_size=vocab)
    inputs = torch.randint(0, vocab, (batch, seq))
    targets = torch.roll(inputs, -1, dims=1)
    model, hf = Transformer(cfg), transformers_model(cfg)
    cpu = torch.device("cpu")
    return {"fastlm": step_fn(model, lambda: model(inputs, targets), cpu),
            "transformers": step_fn(hf, lambda: hf(input_ids=inputs, labels=inputs).loss, cpu)}


def hf_steps(suite: str) -> dict:
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

    return {"fastlm-patched": step_of(patched), "transformers": step_of(base)}


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "train"
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    torch.manual_seed(0)
    steps = train_steps() if which == "train" else hf_steps(which.removeprefix("hf-"))
    for step in steps.values():
        step()
        step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
    for name, ms in median.items():
        print(f"{which} {name}: median {ms:.1f} ms over {reps} alternating steps")
    ours = next(name for name in median if name.startswith("fastlm"))
    print(f"{which}: fastlm is {median['transformers'] / median[ours]:.3f}x transformers' speed")


if __name__ == "__main__":
    main()
