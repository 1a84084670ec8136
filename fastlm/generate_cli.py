"""``fastlm-generate``: continue text with a causal LM (a fastlm checkpoint or a Hugging Face model).

    fastlm-generate --checkpoint runs/tiny --prompt "KING." --max-new-tokens 80
    fastlm-generate --checkpoint runs/tiny/checkpoints/step_00000600 --prompt "To be" --temperature 0
    fastlm-generate --checkpoint runs/tiny --prompts-file prompts.txt --top-p 0.9 --seed 1

``--checkpoint``: a checkpoint directory (model.safetensors + config.json + tokenizer.json, as
fastlm-train writes them), a run's ``--out`` directory (its newest checkpoint is used), or a local
Hugging Face model directory of an architecture fastlm converts (config.json + safetensors +
tokenizer.json; see fastlm/models/hf_convert.py). Prompts are encoded without special tokens, as
fastlm-train encodes documents; write a BOS token into the prompt if an HF model wants one.
One ``--prompt``: the prompt is printed, then the generated text streams to stdout token by
token. ``--prompts-file``: one prompt per line (blank lines skipped), generated as one batch;
each result is printed when the batch is done, as one JSON line
``{"prompt": ..., "completion": ...}`` (completions may span lines). Generation stops at the
tokenizer's end-of-text token or after ``--max-new-tokens``. Weights are read with safetensors
(nothing is unpickled). Bad input ends with one line saying what to change and exit code 2.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from fastlm.generate import GenerationError, generate
from fastlm.train import checkpoint
from fastlm.train.config import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlm-generate", allow_abbrev=False,
                                description="Generate text with a causal LM: a fastlm-train checkpoint or a Hugging "
                                            "Face model directory.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint directory, a run --out directory (its newest checkpoint) or an HF model "
                        "directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="text to continue (streams to stdout)")
    source.add_argument("--prompts-file", metavar="FILE", type=Path,
                        help="one prompt per line, generated as a batch (JSON lines out)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="tokens per prompt (default 128, or as many as the model's context leaves after the prompt)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample from the smallest set of tokens with probability >= P (nucleus)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="makes sampling reproducible")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and KV cache (default float32)")
    return p


def load(path: str, device: torch.device, dtype: torch.dtype):
    """(model in eval mode, tokenizer, EOS id or None) from a fastlm checkpoint, a run directory or
    a Hugging Face model directory (``checkpoint.resolve_pretrained`` tells them apart)."""
    found = checkpoint.resolve_pretrained(path, load_weights=False)  # configs only: check before loading
    if not found.config.causal:
        raise UserError(f"{found.path} is a masked LM (trained with --objective mlm); fastlm-generate needs a causal "
                        "LM (--objective clm)")
    model, tokenizer = checkpoint.load_pretrained_model(found.path, dtype, device)
    return model, tokenizer, found.eos_token_id


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not a device fastlm runs on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but no CUDA device is available; use --device cpu")
    return device


def _prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    try:
        # Newlines only: str.splitlines would also split at form feeds, U+2028 and other separators.
        lines = [line.removesuffix("\r") for line in args.prompts_file.read_text().split("\n")]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --prompts-file {args.prompts_file} ({exc})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompts-file {args.prompts_file} holds no prompt (one per line)")
    return prompts


def run(args) -> None:
    prompts = _prompts(args)
    device = _device(args.device)
    model, tokenizer, eos_id = load(args.checkpoint, device, DTYPES[args.dtype])
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, eos_id=eos_id)
    try:
        if args.prompt is not None:
            printed = []  # the prompt goes out with the first piece, so a rejected prompt prints nothing

            def stream(_row: int, text: str) -> None:
                sys.stdout.write(text if printed else args.prompt + text)
                sys.stdout.flush()
                printed.append(True)

            generate(model, tokenizer, prompts, stream=stream, **options)
            print("" if printed else args.prompt)
        else:
            for prompt, completion in zip(prompts, generate(model, tokenizer, prompts, **options)):
                print(json.dumps({"prompt": prompt, "completion": completion}))
    except GenerationError as exc:  # bad flag values, or a prompt too long for the model's context
        raise UserError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except UserError as exc:
        print(f"fastlm-generate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would fail again
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
