"""fastlm-train under torchrun: 2 CPU processes (gloo) train what 1 process with twice the batch trains,
with DDP and FSDP2, gradient accumulation, AdamW8bit on FSDP2 shards, exact resume, and checkpoints that
load in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, load_model

import fastlm
from fastlm.models import ModelConfig, Transformer
from fastlm.train import main
from fastlm.train.data import PackedData
from tests.train.test_train import cache, corpus, tiny_args  # noqa: F401 (fixtures)

REPO = Path(fastlm.__file__).resolve().parents[1]
# 2 ranks x 2 rows == 1 process x 4 rows; 2 micro-batches per step so the accumulation path runs.
COMMON = ("--steps", "4", "--train.grad_accum=2", "--train.log_every=1", "--eval.every=2", "--checkpoint.every=0")
DROPOUT = ("--model.resid_dropout=0.1", "--model.attn_dropout=0.1", "--model.embd_dropout=0.1")
# fp32 sums in another order: each rank's loss is the mean over its rows and the ranks' gradients are
# averaged by all_reduce / reduce-scatter, where one process sums all rows at once. Observed: relative
# differences of a few 1e-7 over 4 steps.
LOSS_RTOL = 1e-5


def _torchrun(*args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "fastlm.train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _records(out: Path) -> tuple[list[float], list[float]]:
    """The train losses and the validation losses of a run, in step order."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r]


def _final(out: Path) -> Path:
    return out / "checkpoints" / "step_00000004"


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_ranks_read_their_slices_of_the_global_batch(objective):
    """Rank r's micro-batch k is rows [2r, 2r + 2) of what one process with batch 4 reads (MLM masks
    included), and the ranks' validation rows together are the one process's."""
    tokens = torch.randint(2, 97, (3000,), generator=torch.Generator().manual_seed(1)).numpy().astype("uint16")
    tokens[::37] = 0  # EOS
    kwargs = dict(seq_len=16, val_fraction=0.1, eos_id=0, objective=objective, seed=3, mask_id=1, vocab_size=97)
    one = PackedData(tokens, batch_size=4, **kwargs)
    ranks = [PackedData(tokens, batch_size=2, rank=r, world=2, **kwargs) for r in range(2)]
    assert ranks[0].batches_per_epoch == one.batches_per_epoch
    for k in (0, 5, one.batches_per_epoch + 1):  # into the second epoch
        whole = one.train_batch(k)
        parts = [data.train_batch(k) for data in ranks]
        assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
        assert torch.equal(torch.cat([p.targets for p in parts]), whole.targets)
    whole = one.val_batches(100)
    parts = [data.val_batches(100) for data in ranks]
    # 18 validation rows: 4 full global batches and one of 2 rows, split 1 + 1.
    assert one.val_rows == 18 and len(parts[0]) == len(parts[1]) == len(whole) == 5
    for b, batch in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][b].targets, parts[1][b].targets]), batch.targets)


@pytest.fixture(scope="module")
def one_process(corpus, cache, tmp_path_factory):  # noqa: F811 (fixtures)
    """The reference runs, one process with batch 4: {optimizer name: out dir}."""
    outs = {}
    for optimizer in ("adamw", "adamw8bit"):
        outs[optimizer] = tmp_path_factory.mktemp(f"one-{optimizer}")
        args = tiny_args(corpus, cache, outs[optimizer], *COMMON, "--train.batch_size=4", f"--optim.name={optimizer}")
        assert main(args) == 0
    return outs


def _assert_same_training(out: Path, reference: Path, loss_rtol: float) -> None:
    losses, val_losses = _records(out)
    ref_losses, ref_val_losses = _records(reference)
    assert len(losses) == 4 and len(val_losses) == 2
    assert losses == pytest.approx(ref_losses, rel=loss_rtol)
    assert val_losses == pytest.approx(ref_val_losses, rel=loss_rtol)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_train_as_one_process_with_twice_the_batch(mode, corpus, cache, one_process, tmp_path,  # noqa: F811
                                                              capsys):
    """2 ranks x batch 2 == 1 process x batch 4. FSDP also stops and resumes (its full optimizer state
    gathered on save and sharded again on load), and its checkpoint loads into a 1-process model."""
    out = tmp_path / mode
    args = tiny_args(corpus, cache, out, *COMMON, "--train.batch_size=2", f"--parallel.mode={mode}")
    if mode == "fsdp":
        _torchrun(*args, "--stop-at", "2")
        _torchrun(*args, "--resume")
    else:
        _torchrun(*args)
    _assert_same_training(out, one_process["adamw"], LOSS_RTOL)
    # Resuming needs the world size the checkpoint was written with.
    assert main([*args, "--steps", "6", "--resume", "--parallel.mode=none"]) == 2
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().err

    saved = json.loads((_final(out) / "config.json").read_text())
    model = Transformer(ModelConfig.from_dict(saved["model"]))
    missing, unexpected = load_model(model, str(_final(out) / "model.safetensors"), strict=False)
    assert not missing and not unexpected
    reference = load_file(_final(one_process["adamw"]) / "model.safetensors")
    for name, value in model.state_dict().items():
        # Adam divides each update by sqrt(v), so where a gradient is near 0 its last-bit differences move
        # the weight by up to ~lr-sized amounts; observed after 4 steps: at most 1.2e-6 (weights ~0.05).
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-5, msg=name)
    optimizer_keys = load_file(_final(out) / "optimizer.safetensors").keys()
    assert optimizer_keys == load_file(_final(one_process["adamw"]) / "optimizer.safetensors").keys()
    assert json.loads((_final(out) / "trainer_state.json").read_text())["world_size"] == 2


def test_fsdp_adamw8bit_matches_one_process(corpus, cache, one_process, tmp_path):  # noqa: F811
    out = tmp_path / "fsdp8"
    _torchrun(*tiny_args(corpus, cache, out, *COMMON, "--train.batch_size=2", "--parallel.mode=fsdp",
                         "--optim.name=adamw8bit"))
    # Each rank quantizes its own shard of a state in blocks, one process the whole tensor: the block
    # maxima, and so the dequantized moments, differ in the last bits (observed: 1e-7 relative on the loss).
    _assert_same_training(out, one_process["adamw8bit"], loss_rtol=1e-4)
    assert sorted(p.name for p in _final(out).glob("optimizer*")) == [
        "optimizer.json", "optimizer.rank00000.safetensors", "optimizer.rank00001.safetensors"]


def test_fsdp_adamw8bit_resume_with_dropout_is_bit_for_bit(corpus, cache, tmp_path):  # noqa: F811
    """Straight == --stop-at 2 then --resume, bit for bit: per-rank 8-bit optimizer shards and per-rank
    dropout RNG streams (the ranks draw different masks) are saved and restored."""
    args = ("--train.batch_size=2", "--parallel.mode=fsdp", "--optim.name=adamw8bit", *DROPOUT)
    _torchrun(*tiny_args(corpus, cache, tmp_path / "straight", *COMMON, *args))
    split = tiny_args(corpus, cache, tmp_path / "split", *COMMON, *args)
    _torchrun(*split, "--stop-at", "2")
    _torchrun(*split, "--resume")
    names = ["model.safetensors", "optimizer.rank00000.safetensors", "optimizer.rank00001.safetensors",
             "rng.safetensors"]
    for name in names:
        a, b = load_file(_final(tmp_path / "straight") / name), load_file(_final(tmp_path / "split") / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    rng = load_file(_final(tmp_path / "split") / "rng.safetensors")
    assert not torch.equal(rng["rank0.torch_cpu"], rng["rank1.torch_cpu"])
    assert _records(tmp_path / "straight") == _records(tmp_path / "split")


def test_parallel_mode_needs_torchrun(corpus, cache, tmp_path, capsys):  # noqa: F811
    assert main(tiny_args(corpus, cache, tmp_path / "out", "--parallel.mode=fsdp")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastlm-train: error: --parallel.mode=fsdp needs the process group torchrun")
    assert not (tmp_path / "out").exists()
