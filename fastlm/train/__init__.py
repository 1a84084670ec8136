"""``fastlm-train``: pretrain a causal or masked LM on your text with fastlm's fused kernels.

    fastlm-train                                       # tiny preset, shipped Shakespeare corpus, CPU-friendly
    fastlm-train --data my_texts/ --out runs/mine      # your .txt / .md / .jsonl files
    fastlm-train --preset gpt2-124m --data corpus.jsonl --train.batch_size=8
    fastlm-train --preset bert-base --objective mlm --data corpus/
    fastlm-train --out runs/mine --resume              # continue after a stop, crash or Ctrl-C
    fastlm-train --init-from hf_model_dir/ --data pairs.jsonl --export-hf runs/sft/hf   # fine-tune (SFT)
    torchrun --nproc_per_node=8 -m fastlm.train --parallel.mode=fsdp   # DDP (the default) or FSDP2 over ranks

Settings come from a preset (``tiny``, ``gpt2-124m``, ``llama-1b``, ``bert-base``), then
``--config FILE.toml``, then flags; every field of ``fastlm.train.config`` can be set as
``--section.field=value``. Short flags: ``--preset --config --data --out --steps --objective
--seed --resume --stop-at --init-from --export-hf``. ``--init-from`` starts from a fastlm checkpoint or
a local Hugging Face model (Llama, Mistral, Qwen2, Phi-3, GPT-2); .jsonl lines with ``prompt`` and
``response`` are supervised fine-tuning data (loss on the response only); ``--export-hf`` writes the
final model as a transformers directory (docs/training.md, "Fine-tuning from Hugging Face").

A run writes to ``--out``: ``checkpoints/step_XXXXXXXX/`` (weights, optimizer, RNG, data
position, config, tokenizer; the newest ``checkpoint.keep_last`` kept), ``metrics.jsonl`` (loss,
lr, tokens/s, peak memory, MFU on GPU, validation loss and perplexity; mirrored to TensorBoard in
``tensorboard/`` when it is installed) and ``tokenizer.json``.
Ctrl-C or SIGTERM saves a checkpoint after the current step; ``--stop-at STEP`` saves and exits
after that step (the schedule still spans ``--steps``); ``--resume`` continues exactly, bit for
bit on CPU. Bad input ends with one line saying what to change and exit code 2.
"""

from fastlm.train.cli import main

__all__ = ["main"]
