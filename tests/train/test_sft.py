"""Supervised fine-tuning: prompt/response data (masking, packing, errors) and fastlm-train --init-from a
Hugging Face directory or a fastlm run, with --export-hf. The HF models are tiny, randomly initialised and
saved to tmp_path: nothing is downloaded."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlm.train import checkpoint, main
from fastlm.train.config import UserError, resolve
from fastlm.train.data import (END, IGNORE_INDEX, PROMPT, RESPONSE, PackedData, detect_format, read_examples,
                               sft_rows, tokenize_sft)
from tests import tiny_hf

EOS = 0


def _stream(lengths):
    """A token stream of examples with (prompt, response) token counts, each closed by EOS. Token values
    are 100 * (example + 1) + position, so every token names its example."""
    tokens, roles = [], []
    for e, (p, r) in enumerate(lengths):
        tokens += [100 * (e + 1) + i for i in range(p + r)] + [EOS]
        roles += [PROMPT] * p + [RESPONSE] * r + [END]
    return np.asarray(tokens, dtype=np.uint32), np.asarray(roles, dtype=np.uint8)


def test_sft_rows_hold_whole_examples():
    # Examples (EOS included) span [0,4) [4,10) [10,13) [13,25) [25,30) [30,32); rows of 9 tokens.
    _, roles = _stream([(2, 1), (3, 2), (1, 1), (5, 6), (2, 2), (0, 1)])
    starts, ends, cut = sft_rows(roles, span=9)
    # Row 0 holds example 0 only (0 and 1 together need 10 tokens); row 1 examples 1 and 2; the 12-token
    # example 3 is cut to a row of its own; row 3 the last two.
    assert starts.tolist() == [0, 4, 13, 25] and ends.tolist() == [4, 13, 22, 32] and cut == 1


def _expected_targets(tokens, roles, span):
    """The targets SFT must train, once each: per example, the tokens at index 1 .. min(len, span) - 1
    within it (predicted from an earlier token of the same example) that are response tokens or its EOS."""
    out, start = [], 0
    for end in (np.flatnonzero(roles == END) + 1).tolist():
        for i in range(start + 1, min(end, start + span)):
            if roles[i] != PROMPT:
                out.append(int(tokens[i]))
        start = end
    return sorted(out)


@pytest.mark.parametrize("seq_len", [8, 11], ids=["seq8", "seq11"])
def test_sft_masking_and_packing(seq_len):
    """Every response token (and closing EOS) is a target exactly once over an epoch plus the validation
    rows, no prompt token ever is, each target is predicted from its own example, and cu_seqlens puts a
    document boundary after every example."""
    lengths = [tuple(map(int, pr)) for pr in np.random.default_rng(seq_len).integers(0, 6, size=(40, 2))]
    lengths[3] = (7, 9)  # longer than any row: cut
    tokens, roles = _stream(lengths)
    packed = PackedData(tokens, seq_len, 1, 0.1, EOS, "clm", seed=0, roles=roles)
    assert packed.cut_examples == sum(p + r + 1 > seq_len + 1 for p, r in lengths) >= 1 and packed.val_rows >= 1
    batches = [packed.train_batch(k) for k in range(packed.batches_per_epoch)] + packed.val_batches(100)
    seen = []
    for batch in batches:
        inputs, targets = batch.inputs[0], batch.targets[0]  # (T,) each
        cu = batch.cu_seqlens.long()
        assert inputs.shape == targets.shape == (seq_len,) and cu[0] == 0 and cu[-1] == seq_len
        # Documents end exactly after each EOS (every EOS in these streams closes an example).
        assert sorted(set(cu[1:-1].tolist())) == [i + 1 for i in range(seq_len - 1) if inputs[i] == EOS]
        for t in range(seq_len):
            target = int(targets[t])
            if target == IGNORE_INDEX:
                continue
            seen.append(target)
            assert inputs[t] != EOS  # never predicted across an example boundary
            assert target == EOS or target // 100 == inputs[t] // 100  # from its own example
    assert sorted(seen) == _expected_targets(tokens, roles, seq_len + 1)
    prompt_tokens = {int(t) for t, r in zip(tokens, roles) if r == PROMPT}
    assert prompt_tokens and not prompt_tokens & set(seen)


def test_sft_tokenization_keeps_prompt_and_response_apart(tmp_path):
    tok = tiny_hf.tokenizer()
    examples = [("reverse: abc -> ", "cba"), ("", "hello"), ("copy: fox -> ", "")]
    tokens, roles = tokenize_sft(examples, tok, EOS, "hash", tmp_path)
    ends = np.flatnonzero(roles == END)
    assert len(ends) == 3 and (tokens[ends] == EOS).all()
    start = 0
    for (prompt, response), end in zip(examples, ends.tolist()):
        ids, rs = tokens[start:end].tolist(), roles[start:end]
        assert tok.decode([i for i, r in zip(ids, rs) if r == PROMPT]) == prompt
        assert tok.decode([i for i, r in zip(ids, rs) if r == RESPONSE]) == response
        start = end + 1
    again = tokenize_sft(examples, tok, EOS, "hash", tmp_path)  # from the cache
    assert (again[0] == tokens).all() and (again[1] == roles).all()


def test_sft_format_detection_and_bad_lines(tmp_path):
    sft, text = tmp_path / "sft.jsonl", tmp_path / "text.jsonl"
    sft.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    text.write_text(json.dumps({"text": "a", "prompt": "p", "response": "r"}) + "\n")
    (tmp_path / "doc.txt").write_text("hello")
    assert detect_format([sft], "text") == "sft"
    assert detect_format([text], "text") == "text"  # it has a text field: a document
    assert detect_format([sft, tmp_path / "doc.txt"], "text") == "text"
    assert read_examples([sft])[0] == [("a", "b")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:3 has no string field 'response'"):
        read_examples([bad])
    bad.write_text(json.dumps({"prompt": 3, "response": "b"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1 has no string field 'prompt'"):
        read_examples([bad])
    with pytest.raises(UserError, match="must be .jsonl"):
        read_examples([tmp_path / "doc.txt"])
    tokens, roles = _stream([(2, 2)] * 20)
    with pytest.raises(UserError, match="use --objective clm"):
        PackedData(tokens, 4, 1, 0.1, EOS, "mlm", seed=0, roles=roles)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers", reason="building the HF model needs transformers")
    return tiny_hf.save_llama_dir(tmp_path_factory.mktemp("hf") / "llama", tiny_hf.tokenizer())


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    """A learnable task: the response repeats the prompt's word (copy)."""
    rng = np.random.default_rng(0)
    words = ["fox", "dog", "lazy", "quick", "brown", "hello", "abc", "jumps"]
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    lines = []
    for _ in range(300):
        word = words[rng.integers(len(words))]
        lines.append(json.dumps({"prompt": f"copy: {word} -> ", "response": word}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(data, out, cache, *extra):
    return ["--data", str(data), "--out", str(out), f"--data.cache_dir={cache}", "--data.seq_len=32",
            "--train.batch_size=8", "--eval.batches=2", "--eval.every=0", "--checkpoint.every=0",
            "--sample.tokens=0", "--train.log_every=1", "--schedule.warmup_steps=2", "--optim.lr=3e-3", *extra]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("fastlm-train: error: "), err
    return err[-1]


def test_fine_tune_hf_model_on_sft_data_and_export(hf_dir, sft_data, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from fastlm.models.hf_convert import load_hf

    out, export = tmp_path / "run", tmp_path / "export"
    args = _args(sft_data, out, tmp_path / "cache", "--init-from", str(hf_dir), "--steps", "12", "--optim.lr=1e-2",
                 "--export-hf", str(export))
    assert main(args + ["--stop-at", "5"]) == 0  # an interrupted fine-tune resumes like any run
    assert "starting from" in capsys.readouterr().err and not export.exists()
    assert main(args + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    losses = _losses(out)
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses  # observed ~0.6
    saved = json.loads((checkpoint.latest(out) / "config.json").read_text())
    assert saved["model"] == load_hf(hf_dir).cfg.to_dict()  # the model config is the pretrained one
    assert saved["data"]["format"] == "auto" and saved["run"]["init_from"] == str(hf_dir)
    # The exported directory is the final checkpoint, loadable by transformers with the same logits.
    model, tokenizer = checkpoint.load_pretrained_model(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    ids = torch.tensor([tokenizer.encode("copy: fox -> fox").ids])
    with torch.no_grad():
        # Both fp32 on the same weights; the gap is reduction order only (observed ~1e-6).
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(export)("copy: fox")["input_ids"] == \
        tokenizer.encode("copy: fox").ids

    # Continue from that run's directory: the weights come along (the first loss is the trained one).
    again = tmp_path / "again"
    assert main(_args(sft_data, again, tmp_path / "cache", "--init-from", str(out), "--steps", "2",
                      "--model.activation_checkpointing=true")) == 0
    assert _losses(again)[0] < np.mean(losses[:3]) - 1.0  # observed ~3.2 vs ~5.5 at the start


@pytest.mark.parametrize("extra, message", [
    (["--model.d_model=64"], "model.d_model=64 conflicts with --init-from"),
    (["--data.tokenizer=tok.json"], "--data.tokenizer cannot be combined with --init-from"),
    (["--objective", "mlm"], "is a causal LM; train it with --objective clm"),
], ids=["model-override", "tokenizer", "objective"])
def test_init_from_refuses_conflicts(extra, message, hf_dir, sft_data, tmp_path, capsys):
    assert main(_args(sft_data, tmp_path / "run", tmp_path / "cache", "--init-from", str(hf_dir), *extra)) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_from_bad_paths(sft_data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for path, message in [(tmp_path / "nowhere", "no such directory"), (tmp_path / "empty", "neither a fastlm"),
                          (bert, "unsupported Hugging Face model_type 'bert'")]:
        assert main(_args(sft_data, tmp_path / "run", tmp_path / "cache", "--init-from", str(path))) == 2
        assert message in _error_line(capsys)


def test_export_hf_refuses_an_unexportable_model_before_training(sft_data, tmp_path, capsys):
    code = main(_args(sft_data, tmp_path / "run", tmp_path / "cache", "--export-hf", str(tmp_path / "hf"),
                      "--model.position=learned"))
    assert code == 2 and "--export-hf: no Hugging Face architecture matches" in _error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_free_model_fields_apply_under_init_from(hf_dir):
    cfg = resolve("tiny", None, [("run.init_from", str(hf_dir)), ("model.attn_dropout", "0.1"),
                                 ("model.max_seq_len", "32")])
    assert (cfg.model.d_model, cfg.model.vocab_size, cfg.model.attn_dropout, cfg.model.max_seq_len) == (32, 320, 0.1, 32)
    assert cfg.model.n_layers == 2  # the tiny preset's 4 layers yield to the pretrained model's


def test_rope_scaling_from_the_command_line_and_toml(tmp_path):
    cfg = resolve("tiny", None, [("model.rope_scaling", '{"rope_type": "linear", "factor": 2}')])
    assert cfg.model.rope_scaling == {"rope_type": "linear", "factor": 2}
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\nrope_scaling = {rope_type = "linear", factor = 4.0}\n')
    assert resolve("tiny", str(toml), []).model.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    with pytest.raises(UserError, match="model.rope_scaling must be a JSON object"):
        resolve("tiny", None, [("model.rope_scaling", "linear")])
    with pytest.raises(UserError, match="rope_type one of"):
        resolve("tiny", None, [("model.rope_scaling", '{"rope_type": "yarn"}')])
