"""``fastlm-train``: pretrain a causal or masked LM on your text with fastlm's fused kernels.

    fastlm-train                                       # tiny preset, shipped Shakespeare corpus, CPU-friendly
    fastlm-train --data my_texts/ --out runs/mine      # your .txt / .md / .jsonl files
    fastlm-train --preset gpt2-124m --data corpus.jsonl --train.batch_size=8
    fastlm-train --preset bert-base --objective mlm --data corpus/
    fastlm-train --out runs/mine --resume              # continue after a stop, crash or Ctrl-C
    torchrun --nproc_per_node=8 -m fastlm.train --parallel.mode=fsdp   # DDP (the default) or FSDP2 over ranks

Settings come from a preset (``tiny``, ``gpt2-124m``, ``llama-1b``, ``bert-base``), then
``--config FILE.toml``, then flags; every field of ``fastlm.train.config`` can be set as
``--section.field=value``. Short flags: ``--preset --config --data --out --steps --objective
--seed --resume --stop-at``.

A run writes to ``--out``: ``checkpoints/step_XXXXXXXX/`` (weights, optimizer, RNG, data
position, config, tokenizer; the newest ``checkpoint.keep_last`` kept), ``metrics.jsonl`` (loss,
lr, tokens/s, peak memory, MFU on GPU, validation loss and perplexity) and ``tokenizer.json``.
Ctrl-C or SIGTERM saves a checkpoint after the current step; ``--stop-at STEP`` saves and exits
after that step (the schedule still spans ``--steps``); ``--resume`` continues exactly, bit for
bit on CPU. Bad input ends with one line saying what to change and exit code 2.
"""

from fastlm.train.cli import main

__all__ = ["main"]
