"""fastlm-train: config, data packing and MLM masking, schedules, checkpoints, exact resume,
CLI runs for both objectives, and the one-line errors for bad input."""

import gzip
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastlm.models import ModelConfig, Transformer
from fastlm.train import checkpoint, main
from fastlm.train.config import UserError, resolve
from fastlm.train.data import IGNORE_INDEX, PackedData, document_boundaries, mask_tokens, shipped_corpus
from fastlm.train.trainer import lr_factor, param_groups


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three works from the shipped corpus, cut to 12k characters each: a directory of .txt files."""
    root = tmp_path_factory.mktemp("corpus")
    with gzip.open(shipped_corpus(), "rt") as f:
        for i, line in zip(range(3), f):
            (root / f"doc{i}.txt").write_text(json.loads(line)["text"][:12000])
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_args(corpus, cache, out, *extra):
    return ["--data", str(corpus), "--out", str(out), f"--data.cache_dir={cache}",
            "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2", "--model.n_kv_heads=1",
            "--model.max_seq_len=32", "--data.seq_len=32", "--data.vocab_size=320", "--data.val_fraction=0.05",
            "--train.batch_size=4", "--eval.batches=2", "--eval.every=3", "--checkpoint.every=3",
            "--sample.tokens=4", "--train.log_every=2", "--schedule.warmup_steps=2", *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("fastlm-train: error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


# ---------------------------------------------------------------------------------------- config
def test_config_layers_and_overrides(tmp_path):
    cfg = resolve("tiny", None, [])
    assert cfg.model.norm == "rmsnorm" and cfg.run.out == "runs/tiny" and cfg.train.objective == "clm"
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\nd_model = 64\nn_heads = 2\n[schedule]\nkind = "step"\n')
    cfg = resolve("gpt2-124m", str(toml), [("train.steps", "7"), ("model.n_kv_heads", "none"),
                                            ("train.compile", "true"), ("optim.lr", "1e-3")])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.d_ff) == (64, 2, 2, 256)
    assert cfg.schedule.kind == "step" and cfg.train.steps == 7 and cfg.train.compile and cfg.optim.lr == 1e-3
    for preset in ("llama-1b", "bert-base"):
        resolve(preset, None, [])
    assert resolve("bert-base", None, []).train.objective == "mlm"


@pytest.mark.parametrize("override, message", [
    (("train.stepz", "3"), "unknown field train.stepz"),
    (("trian.steps", "3"), "unknown section"),
    (("train.steps", "three"), "train.steps must be an integer"),
    (("schedule.kind", "wavy"), "schedule.kind must be one of"),
    (("model.d_model", "130"), "divisible by model.n_heads"),
    (("train.batch_size", "0"), "train.batch_size must be a positive integer, got 0"),
    (("train.grad_accum", "-1"), "train.grad_accum must be a positive integer, got -1"),
    (("train.steps", "0"), "train.steps must be a positive integer, got 0"),
    (("data.seq_len", "0"), "data.seq_len must be a positive integer, got 0"),
    (("data.val_fraction", "1"), r"data.val_fraction must be in \(0, 1\), got 1.0"),
    (("eval.batches", "0"), "eval.batches must be a positive integer, got 0"),
    (("checkpoint.keep_last", "-1"), r"checkpoint.keep_last must be >= 0 \(0: keep all\), got -1"),
    (("optim.lr", "nan"), "optim.lr must be a finite number >= 0, got nan"),
    (("optim.beta2", "1"), r"optim.beta2 must be in \[0, 1\), got 1.0"),
    (("optim.weight_decay", "-0.1"), "optim.weight_decay must be >= 0, got -0.1"),
    (("schedule.min_lr_ratio", "2"), r"schedule.min_lr_ratio must be in \[0, 1\], got 2.0"),
    (("sample.tokens", "-1"), "sample.tokens must be >= 0"),
    (("model.rope_theta", "-1"), "model.rope_theta must be > 0, got -1.0"),
], ids=["field", "section", "int", "literal", "model-check", "batch-size", "grad-accum", "steps", "seq-len",
        "val-fraction", "eval-batches", "keep-last", "lr-nan", "beta2", "weight-decay", "min-lr-ratio", "sample-tokens",
        "rope-theta"])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(UserError, match=message):
        resolve("tiny", None, [override])


def test_lr_schedules():
    cfg = resolve("tiny", None, [("schedule.warmup_steps", "10"), ("schedule.min_lr_ratio", "0.1")]).schedule
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1) and lr_factor(9, 110, cfg) == pytest.approx(1.0)
    expected = {"cosine": (0.55, 0.1), "linear": (0.55, 0.1), "constant": (1.0, 1.0),
                "exponential": (0.1 ** 0.5, 0.1), "step": (0.5, 0.125)}
    for kind, (mid, end) in expected.items():
        cfg.kind = kind
        # 111 steps: after 10 of warmup, steps 10..110 span the schedule, step 60 its middle and the
        # last step (110) its end.
        assert lr_factor(60, 111, cfg) == pytest.approx(mid), kind
        assert lr_factor(110, 111, cfg) == pytest.approx(end), kind


# ------------------------------------------------------------------------------------------ data
def test_mlm_masking_statistics():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 1000, (200, 500), generator=gen)
    tokens[:, ::50] = 0  # EOS tokens are never selected
    inputs, targets = mask_tokens(tokens, mask_id=1, eos_id=0, vocab_size=1000, probability=0.15, generator=gen)
    selected = targets != IGNORE_INDEX
    eligible = (tokens != 0).sum().item()
    assert not selected[tokens == 0].any()
    assert torch.equal(targets[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected])
    n = selected.sum().item()
    # Bounds of about 4.5 binomial standard deviations: 98k eligible tokens, ~14.7k selected.
    assert abs(n / eligible - 0.15) < 0.005
    masked = (inputs[selected] == 1).sum().item() / n
    kept = (inputs[selected] == tokens[selected]).sum().item() / n
    # "kept" also counts the random replacements that drew the original token (0.1% of them).
    assert abs(masked - 0.8) < 0.015 and abs(kept - 0.1 - 0.0001) < 0.01
    assert abs(1 - masked - kept - 0.1) < 0.01


def test_document_boundaries():
    inputs = torch.tensor([[5, 0, 6, 7], [8, 9, 0, 0]])  # EOS = 0
    cu, longest = document_boundaries(inputs, eos_id=0)
    assert cu.tolist() == [0, 2, 4, 7, 8] and cu.dtype == torch.int32 and longest == 3


def test_packed_rows_are_deterministic_and_shifted():
    tokens = (torch.arange(1000) % 97).numpy().astype("uint16")
    data = PackedData(tokens, seq_len=16, batch_size=4, val_fraction=0.1, eos_id=96, objective="clm", seed=3)
    a, b = data.train_batch(5), data.train_batch(5)
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, data.train_batch(6).inputs)
    assert torch.equal((a.inputs + 1) % 97, a.targets)  # targets are the next tokens
    assert a.cu_seqlens[-1] == 64 and a.inputs.shape == (4, 16)
    # An epoch visits every training row once; none reach into the validation tail.
    starts = torch.cat([data.train_batch(k).inputs[:, 0] for k in range(data.batches_per_epoch)])
    assert len(starts) == data.batches_per_epoch * 4 and data.train_rows * 16 + 1 <= data.val_start
    val = data.val_batches(100)
    assert sum(len(v.inputs) for v in val) == data.val_rows


# ----------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    cfg = ModelConfig.gpt2(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    opt.step()
    rng_before = torch.get_rng_state()
    path = checkpoint.save(tmp_path, 7, model, opt, {"model": cfg.to_dict()}, "{}", {"micro_batch": 7}, keep_last=2)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "config.json",
         "tokenizer.json", "trainer_state.json"])
    torch.rand(5)  # move the RNG on
    fresh = Transformer(cfg)
    fresh_opt = torch.optim.AdamW(param_groups(fresh, 0.1), lr=1e-3)
    state = checkpoint.load(path, fresh, fresh_opt)
    assert state["step"] == 7 and state["micro_batch"] == 7
    assert torch.equal(torch.get_rng_state(), rng_before)
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key])
    for step in (8, 9):
        checkpoint.save(tmp_path, step, model, opt, {}, "{}", {}, keep_last=2)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step_00000008", "step_00000009"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


# --------------------------------------------------------------------------------- CLI end to end
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_stop_and_resume_is_bit_for_bit(optimizer, corpus, cache, tmp_path, capsys):
    """--steps 6 straight == --steps 6 --stop-at 3, then --steps 6 --resume (dropout on)."""
    extra = ["--steps", "6", "--model.resid_dropout=0.1", "--model.attn_dropout=0.1", "--model.embd_dropout=0.1",
             f"--optim.name={optimizer}"]
    assert main(tiny_args(corpus, cache, tmp_path / "straight", *extra)) == 0
    assert main(tiny_args(corpus, cache, tmp_path / "split", *extra, "--stop-at", "3")) == 0
    assert "--resume" in capsys.readouterr().err
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path / "split")] == ["step_00000003"]
    assert main(tiny_args(corpus, cache, tmp_path / "split", *extra, "--resume")) == 0
    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(tmp_path / "straight/checkpoints/step_00000006" / name)
        b = load_file(tmp_path / "split/checkpoints/step_00000006" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    losses = [json.loads(line) for line in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [2, 4, 6]


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_cli_smoke(objective, corpus, cache, tmp_path, capsys):
    out = tmp_path / objective
    assert main(tiny_args(corpus, cache, out, "--steps", "4", "--objective", objective)) == 0
    stdout = capsys.readouterr().out
    assert "val loss" in stdout and "--- sample" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]["summary"]
    assert summary["steps"] == 4 and math.isfinite(summary["val_loss"])
    assert any("val_ppl" in r for r in records) and (out / "tokenizer.json").exists()
    assert (out / "tensorboard").is_dir() == (importlib.util.find_spec("tensorboard") is not None)
    saved = json.loads((out / "checkpoints/step_00000004/config.json").read_text())
    assert saved["model"]["causal"] == (objective == "clm") and saved["train"]["objective"] == objective


# ------------------------------------------------------------------------------------- bad input
def test_bad_data_paths(corpus, cache, tmp_path, capsys):
    assert main(tiny_args(tmp_path / "missing", cache, tmp_path / "o1")) == 2
    assert "does not exist" in _error_line(capsys)
    (tmp_path / "empty.txt").write_text("  \n")
    assert main(tiny_args(tmp_path / "empty.txt", cache, tmp_path / "o2")) == 2
    assert "the data is empty" in _error_line(capsys)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    assert main(tiny_args(tmp_path / "bad.jsonl", cache, tmp_path / "o3")) == 2
    assert "no string field 'text'" in _error_line(capsys)
    (tmp_path / "tok.json").write_text("not a tokenizer")
    assert main(tiny_args(corpus, cache, tmp_path / "o4", f"--data.tokenizer={tmp_path / 'tok.json'}")) == 2
    assert "cannot load tokenizer" in _error_line(capsys)
    (tmp_path / "file").write_text("")
    assert main(tiny_args(corpus, cache, tmp_path / "file" / "o5")) == 2
    assert f"--out {tmp_path / 'file' / 'o5'}: {tmp_path / 'file'} is not a writable directory" in _error_line(capsys)
    assert main(tiny_args(corpus, cache, tmp_path / "o6", "--export-hf", str(tmp_path / "file" / "hf"))) == 2
    assert f"--export-hf {tmp_path / 'file' / 'hf'}: {tmp_path / 'file'} is not a writable" in _error_line(capsys)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_directory_that_refuses_writes_is_refused_before_training(tmp_path, capsys):
    """/proc passes os.access for root, yet takes no new folder: the check tries one."""
    assert main(["--steps", "2", "--out", str(tmp_path / "ok"), "--export-hf", "/proc/fastlm-hf"]) == 2
    assert "--export-hf /proc/fastlm-hf: /proc is not a writable directory" in _error_line(capsys)
    assert not (tmp_path / "ok").exists()


def test_checkpoints_are_never_touched_by_a_wrong_run(corpus, cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(corpus, cache, out, "--steps", "3")) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(tiny_args(corpus, cache, out, "--steps", "6")) == 2  # fresh run into a used --out
    assert "pass --resume" in _error_line(capsys)
    assert main(tiny_args(corpus, cache, out, "--steps", "6", "--resume", "--model.d_model=48")) == 2
    assert "another model config (model.d_model=32 there, 48 here" in _error_line(capsys)
    assert main(tiny_args(corpus, cache, tmp_path / "empty_out", "--resume")) == 2
    assert "no checkpoint" in _error_line(capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (checkpoint.latest(out) / "optimizer.safetensors").write_bytes(b"truncated")
    assert main(tiny_args(corpus, cache, out, "--steps", "6", "--resume")) == 2
    assert "is incomplete or corrupt" in _error_line(capsys)


def test_resume_switches_adamw_to_8bit_states_and_never_back(corpus, cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(corpus, cache, out, "--steps", "3")) == 0
    capsys.readouterr()
    assert main(tiny_args(corpus, cache, out, "--steps", "6", "--resume", "--optim.name=adamw8bit")) == 0
    assert "AdamW moments were quantized into AdamW8bit's states" in capsys.readouterr().err
    saved = load_file(checkpoint.latest(out) / "optimizer.safetensors")
    assert any(key.endswith(".state1") for key in saved)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(tiny_args(corpus, cache, out, "--steps", "9", "--resume")) == 2
    assert "trained with --optim.name adamw8bit, whose states --optim.name adamw cannot take" in _error_line(capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_module_entry_point_reports_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastlm.train", "--data", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fastlm-train: error: data path {tmp_path / 'nope'} does not exist; pass --data FILE_OR_DIR (.txt, .md, "
        ".jsonl, optionally .gz)"]


def test_sigterm_saves_a_checkpoint_and_exits(corpus, cache, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    args = tiny_args(corpus, cache, out, "--steps", "100000", "--checkpoint.every=0", "--eval.every=0")
    proc = subprocess.Popen([sys.executable, "-m", "fastlm.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    (saved,) = checkpoint.checkpoint_dirs(out)
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["reason"] == "SIGTERM" and state["step"] >= 2 and "Traceback" not in err


def test_keep_freed_host_memory_sets_glibc_options():
    """In a child process: the setting is process-wide and permanent."""
    import platform

    code = "from fastlm.train.cli import keep_freed_host_memory; print(keep_freed_host_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out == str(expected)
