"""Memory-lean optimizers: block-wise 8-bit AdamW, Adam and Lion."""

from fastlm.optim.optim8bit import Adam8bit, AdamW8bit, CPUOffloadAdamW8bit, Lion8bit

__all__ = ["AdamW8bit", "Adam8bit", "Lion8bit", "CPUOffloadAdamW8bit"]
