"""Train a small Llama-style model with the transformers Trainer, fastlm kernels and fastlm's 8-bit AdamW.

    pip install "fastlm[hf]"
    python examples/hf_trainer.py --steps 50                      # patched model + AdamW8bit
    python examples/hf_trainer.py --steps 50 --no-patch --optimizer torch   # the plain transformers baseline

The model is built from a config (nothing is downloaded) and trained on a synthetic copy task, so the loss
must fall. Two ways to give the Trainer fastlm's optimizer, both shown below:
  * ``optimizer_cls_and_kwargs=(AdamW8bit, {...})``: the Trainer builds it over the model's parameters
    (with its weight-decay parameter groups) -- the route that also works with ``--optim`` style configs;
  * ``optimizers=(AdamW8bit(model.parameters(), ...), None)``: you build it yourself.
Gradient accumulation is exact with the patched loss: the Trainer passes ``num_items_in_batch`` and
``fastlm.patch_hf`` divides the summed token losses by it.
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import fastlm


class CopyTask(torch.utils.data.Dataset):
    """Sequences whose second half repeats the first: learnable, so the loss visibly falls."""

    def __init__(self, size: int, seqlen: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        half = torch.randint(3, vocab, (size, seqlen // 2), generator=g)
        self.ids = torch.cat([half, half], dim=1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--no-patch", action="store_true", help="train the unpatched transformers model")
    p.add_argument("--optimizer", choices=("adamw8bit", "adamw8bit-instance", "torch"), default="adamw8bit")
    p.add_argument("--output-dir", default="out/hf_trainer")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    if not args.no_patch:
        print(fastlm.patch_hf(model))

    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=3e-3, weight_decay=0.01, logging_steps=10,
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
    )
    extra = {}
    if args.optimizer == "adamw8bit":
        from fastlm.optim import AdamW8bit

        extra["optimizer_cls_and_kwargs"] = (AdamW8bit, {"lr": training.learning_rate,
                                                         "weight_decay": training.weight_decay})
    elif args.optimizer == "adamw8bit-instance":
        from fastlm.optim import AdamW8bit

        extra["optimizers"] = (AdamW8bit(model.parameters(), lr=training.learning_rate,
                                         weight_decay=training.weight_decay), None)
    trainer = Trainer(model=model, args=training, train_dataset=CopyTask(2048, 64, config.vocab_size), **extra)
    result = trainer.train()
    print(f"final training loss {result.training_loss:.4f} after {result.global_step} steps")


if __name__ == "__main__":
    main()
