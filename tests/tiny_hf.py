"""Tiny Hugging Face artefacts built locally for the conversion and fine-tuning tests (nothing downloaded)."""

from pathlib import Path

import torch

TOKENIZER_TEXT = ["the quick brown fox jumps over the lazy dog", "reverse: abc -> cba", "copy: hello -> hello"]


def tokenizer(vocab_size: int = 300):
    """A byte-level BPE with <|endoftext|> (id 0), trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXT * 20, trainer)
    return tok


def save_llama_dir(path: Path, tok, hidden: int = 32, layers: int = 2, std: float = 0.02) -> Path:
    """A randomly initialised LlamaForCausalLM (GQA, untied) for ``tok``, saved with its tokenizer.json."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=std,
        bos_token_id=None, eos_token_id=tok.token_to_id("<|endoftext|>"), pad_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    (Path(path) / "tokenizer.json").write_text(tok.to_str())
    return Path(path)
