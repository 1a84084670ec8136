"""fastlm.models.hf_convert on tiny randomly initialised transformers models (built from configs and saved
with save_pretrained to tmp_path; nothing is downloaded).

Logits follow the house rule: fastlm's fp32 model against the transformers model in float64, with the
transformers fp32 model's error as the baseline (fastlm.testing.assert_matches_reference).
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the conversion tests compare with transformers")

from fastlm.models import ModelConfig, Transformer  # noqa: E402
from fastlm.models.hf_convert import export_type, from_hf, hf_state_dict, load_hf, save_hf  # noqa: E402
from fastlm.testing import assert_matches_reference  # noqa: E402
from tests import tiny_hf  # noqa: E402

VOCAB, HIDDEN, HEADS, LAYERS, FFN = 97, 32, 4, 2, 48


def _hf_config(arch):
    t = transformers
    # Non-default theta and eps, so a converter that ignores them fails; a std of 0.2 makes the logits
    # depend on every weight (at 0.02 they are nearly the embedding's bias-free average).
    decoder = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64,
                   rms_norm_eps=1e-5, rope_theta=500.0, initializer_range=0.2)
    gpt2 = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, n_inner=FFN,
                layer_norm_epsilon=1e-4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2,
                bos_token_id=0, eos_token_id=0)
    return {
        "llama-gqa": lambda: t.LlamaConfig(**decoder),
        "llama-tied-mha": lambda: t.LlamaConfig(**{**decoder, "num_key_value_heads": HEADS}, tie_word_embeddings=True),
        "llama-bias": lambda: t.LlamaConfig(**decoder, attention_bias=True, mlp_bias=True),
        "mistral-window": lambda: t.MistralConfig(**decoder, sliding_window=5),  # shorter than the 13 tokens
        # Llama 3.1-style scaling with an original context of 8 tokens, so the 13-token inputs and the
        # 8-dim heads' wavelengths (2 pi .. ~2 pi * 500^(3/4)) straddle all three frequency bands.
        "llama3-rope-scaling": lambda: t.LlamaConfig(**{**decoder, "rope_theta": None}, rope_parameters=dict(
            rope_type="llama3", rope_theta=500.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8)),
        "llama-linear-rope": lambda: t.LlamaConfig(**{**decoder, "rope_theta": None}, rope_parameters=dict(
            rope_type="linear", rope_theta=500.0, factor=2.5)),
        "qwen2-gqa": lambda: t.Qwen2Config(**decoder),
        "phi3-gqa-window": lambda: t.Phi3Config(**decoder, sliding_window=6, pad_token_id=None, eos_token_id=None),
        "gpt2-tied": lambda: t.GPT2Config(**gpt2),
        "gpt2-untied": lambda: t.GPT2Config(**gpt2, tie_word_embeddings=False),
    }[arch]()


ARCHS = ["llama-gqa", "llama-tied-mha", "llama-bias", "llama3-rope-scaling", "llama-linear-rope", "mistral-window",
         "qwen2-gqa", "phi3-gqa-window", "gpt2-tied", "gpt2-untied"]


def _hf_model(arch):
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch)).eval()
    with torch.no_grad():  # norms start at weight 1, bias 0 and biases at 0: randomise them too
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _assert_same_logits(name, fastlm_model, hf_model, ids):
    ref_model = transformers.AutoModelForCausalLM.from_config(hf_model.config).double().eval()
    ref_model.load_state_dict(hf_model.state_dict())
    with torch.no_grad():
        out = fastlm_model(ids)
        ref = ref_model(ids).logits
        base = hf_model(ids).logits
    assert_matches_reference(f"{name} logits", out, ref, base, torch.float32)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_matches_transformers(arch, tmp_path):
    hf = _hf_model(arch)
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    cfg = model.cfg
    assert (cfg.rope_theta, cfg.norm_eps) == ((500.0, 1e-5) if cfg.position == "rope" else (10000.0, 1e-4))
    assert cfg.tie_embeddings == ("tied" in arch.split("-"))
    assert cfg.n_kv_heads == (HEADS if arch == "llama-tied-mha" or arch.startswith("gpt2") else 2)
    assert cfg.sliding_window == {"mistral-window": 5, "phi3-gqa-window": 6}.get(arch)
    assert (cfg.rope_scaling or {}).get("rope_type") == {"llama3-rope-scaling": "llama3",
                                                         "llama-linear-rope": "linear"}.get(arch)
    _assert_same_logits(arch, model, hf, torch.randint(0, VOCAB, (2, 13)))


def test_from_model_object_equals_from_directory(tmp_path):
    hf = _hf_model("qwen2-gqa")
    hf.save_pretrained(tmp_path)
    cfg_dir, state_dir = from_hf(tmp_path)
    cfg_obj, state_obj = from_hf(hf)
    assert cfg_dir == cfg_obj and cfg_dir.qkv_bias and not cfg_dir.bias
    assert state_dir.keys() == state_obj.keys()
    for key in state_dir:
        torch.testing.assert_close(state_dir[key], state_obj[key], rtol=0, atol=0, msg=key)


def test_sharded_checkpoint_and_original_gpt2_names(tmp_path):
    """A sharded save (index.json) and GPT-2 files without the 'transformer.' prefix (as the original
    openai-community/gpt2 upload), with its causal-mask buffers, load the same weights."""
    from safetensors.torch import save_file

    hf = _hf_model("gpt2-tied")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    original = tmp_path / "original"
    original.mkdir()
    (original / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    tensors = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(tensors, str(original / "model.safetensors"))
    _, a = from_hf(tmp_path / "sharded")
    _, b = from_hf(original)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


EXPORTS = {
    "llama-gqa-untied": ModelConfig.llama(n_heads=4, n_kv_heads=2, rope_theta=321.0, norm_eps=1e-6),
    "llama-bias-tied": ModelConfig.llama(n_heads=4, bias=True, tie_embeddings=True),
    "qwen2-qkv-bias": ModelConfig.llama(n_heads=4, n_kv_heads=1, qkv_bias=True),
    "mistral-window": ModelConfig.llama(n_heads=4, n_kv_heads=2, sliding_window=6),
    "llama-llama3-rope": ModelConfig.llama(n_heads=4, rope_theta=300.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=2.0, original_max_position_embeddings=6)),
    "gpt2-tied": ModelConfig.gpt2(n_heads=4, norm_eps=1e-4),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_round_trip(name, tmp_path):
    cfg = EXPORTS[name].replace(vocab_size=320, d_model=HIDDEN, n_layers=LAYERS, max_seq_len=48, d_ff=40, init_std=0.2)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    tokenizer = tiny_hf.tokenizer()
    save_hf(model, tokenizer, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__.lower().startswith(name.split("-")[0])
    _assert_same_logits(name, model, hf, torch.randint(0, 320, (2, 13)))
    back = load_hf(tmp_path)
    assert back.cfg == cfg.replace(init_std=back.cfg.init_std)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0, msg=key)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "the lazy fox"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tok.eos_token == "<|endoftext|>" and hf.config.eos_token_id == tokenizer.token_to_id("<|endoftext|>")


def test_export_dtype_and_names():
    model = Transformer(ModelConfig.gpt2(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    names = hf_state_dict(model)
    assert names["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D: (in, out)
    assert "lm_head.weight" not in names  # tied: the embedding is the head


# ------------------------------------------------------------------------------------------------ errors
def _saved(tmp_path, arch="llama-gqa", **config_changes):
    _hf_model(arch).save_pretrained(tmp_path)
    if config_changes:
        config = json.loads((tmp_path / "config.json").read_text())
        config.update(config_changes)
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "bert"}, "unsupported Hugging Face model_type 'bert'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}}, "rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"head_dim": 16}, "head_dim 16"),
    ({"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
    ({"num_hidden_layers": 1}, "does not use"),
    ({"num_key_value_heads": 4}, "has shape"),
    ({"hidden_size": None}, "has no 'hidden_size'"),
], ids=["model-type", "rope-scaling", "activation", "head-dim", "mixed-bias", "extra-tensors", "shape",
        "missing-field"])
def test_bad_configs_are_refused(changes, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        from_hf(_saved(tmp_path, **changes))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_hf(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path)
    path = _saved(tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_hf(path)
    with pytest.raises(TypeError, match="expected a directory or a transformers model"):
        from_hf(42)


def _truncated_weights(path):
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(1000)


def _garbage_weights(path):
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 4)


def _index(content):
    def write(path):
        (path / "model.safetensors").rename(path / "m1.safetensors")
        (path / "model.safetensors.index.json").write_text(content)
    return write


@pytest.mark.parametrize("damage, file", [
    (_truncated_weights, "model.safetensors"), (_garbage_weights, "model.safetensors"),
    (_index('{"metadata": {}}'), "model.safetensors.index.json"), (_index('{"weight_map": '), "model.safetensors.index.json"),
    (_index("[]"), "model.safetensors.index.json"), (_index('{"weight_map": {"a": 3}}'), "model.safetensors.index.json"),
], ids=["truncated", "garbage", "index-no-weight-map", "index-not-json", "index-list", "index-bad-map"])
def test_damaged_weight_files_are_named_in_one_line(damage, file, tmp_path, capsys):
    from fastlm.models.hf_convert import main
    from fastlm.train import checkpoint
    from fastlm.train.config import UserError

    path = _saved(tmp_path / "m")
    (path / "tokenizer.json").write_text(tiny_hf.tokenizer().to_str())
    damage(path)
    with pytest.raises(ValueError) as err:
        from_hf(path)
    assert f"{path / file} is damaged (" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="is damaged"):  # fastlm-generate, fastlm-train --init-from
        checkpoint.load_pretrained_model(path)
    assert main([str(path), str(tmp_path / "out")]) == 2
    assert f"hf_convert: error: {path}: {path / file} is damaged (" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_cli_refuses_an_out_dir_under_a_file(tmp_path, capsys):
    from fastlm.models.hf_convert import main

    path = _saved(tmp_path / "m")
    (path / "tokenizer.json").write_text(tiny_hf.tokenizer().to_str())
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()  # save_pretrained's progress bar
    for out in (tmp_path / "afile" / "x", tmp_path / "afile"):
        assert main([str(path), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"hf_convert: error: cannot write {out}: {tmp_path / 'afile'} is a file"), err
    assert (tmp_path / "afile").read_text() == "x"


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="no tensor model.layers.1.self_attn.k_proj.weight"):
        from_hf(path)


@pytest.mark.parametrize("cfg, message", [
    (ModelConfig.bert(vocab_size=64, d_model=16, n_layers=1, n_heads=2), "only causal LMs"),
    (ModelConfig.gpt2(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1), "n_kv_heads=1/2"),
    (ModelConfig.llama(vocab_size=64, d_model=16, n_layers=1, n_heads=2, position="learned"), "position=learned"),
], ids=["encoder", "gpt2-gqa", "llama-learned-positions"])
def test_unexportable_models_are_refused(cfg, message, tmp_path):
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=message):
        export_type(cfg)
    with pytest.raises(ValueError, match=message):
        save_hf(Transformer(cfg), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_cli_from_a_fastlm_checkpoint(tmp_path, capsys):
    """python -m fastlm.models.hf_convert RUN_DIR OUT: the newest checkpoint of a run -> an HF directory."""
    from fastlm.models.hf_convert import main
    from fastlm.train import checkpoint

    cfg = ModelConfig.llama(vocab_size=320, d_model=HIDDEN, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16,
                            init_std=0.2)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    tokenizer = tiny_hf.tokenizer()
    checkpoint.save(tmp_path / "run", 3, model, optimizer, {"model": cfg.to_dict()}, tokenizer.to_str(), {}, 1)
    assert main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "llama" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _assert_same_logits("exported checkpoint", model.eval(), hf, torch.randint(0, 320, (1, 9)))
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "hf2")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_bf16_checkpoints_load_as_fp32_and_export_in_a_chosen_dtype(tmp_path):
    from safetensors import safe_open

    hf = _hf_model("llama-gqa").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    model = load_hf(tmp_path / "bf16")
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
    torch.testing.assert_close(model.tok_emb.weight, hf.model.embed_tokens.weight.float(), rtol=0, atol=0)
    save_hf(model, None, tmp_path / "out", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # no tokenizer given: weights and config only
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
    torch.testing.assert_close(weight, hf.model.layers[0].self_attn.k_proj.weight, rtol=0, atol=0)


def test_sliding_window_holds_in_packed_sequences():
    """The window (tested against transformers on dense input above) also applies per packed document:
    packed logits equal each document's own."""
    cfg = ModelConfig.llama(vocab_size=64, d_model=HIDDEN, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                            sliding_window=4, init_std=0.2)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 64, (1, 19))
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    with torch.no_grad():
        packed = model.hidden_states(ids, cu, 12)
        alone = torch.cat([model.hidden_states(ids[:, :7]), model.hidden_states(ids[:, 7:])], dim=1)
        full = model.hidden_states(ids[:, 7:])
        no_window = Transformer(cfg.replace(sliding_window=None)).eval()
        no_window.load_state_dict(model.state_dict())
        assert not torch.allclose(no_window.hidden_states(ids[:, 7:]), full, atol=1e-3)  # the window matters
    # Same computation, different kernels (packed vs dense): fp32 rounding only (observed ~1e-7).
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes, message", [
    (dict(sliding_window=0), "sliding_window must be a positive integer"),
    (dict(sliding_window=4, causal=False), "sliding_window needs a causal model"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type one of"),
    (dict(rope_scaling={"rope_type": "linear"}), r"rope_scaling\['factor'\] must be a positive number"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1,
                        "original_max_position_embeddings": 8}), "high_freq_factor must exceed"),
], ids=["window-zero", "window-encoder", "rope-type", "rope-missing-factor", "rope-bands"])
def test_config_checks(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.llama(**changes)
