"""fastlm-train at the edges of a run: resuming a finished or changed run, signals during the final
evaluation, running out of host memory, and metrics of skipped steps."""

import json
import os
import signal

import pytest

from fastlm.train import checkpoint, trainer
from fastlm.train.cli import main
from tests.train.test_train import _error_line, cache, corpus, tiny_args  # noqa: F401 (fixtures)


def _files(out):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(corpus, cache, tmp_path_factory):  # noqa: F811 (the fixtures imported above)
    """A completed 4-step run (checkpoint step_00000004) and a run stopped at step 2 of 4."""
    root = tmp_path_factory.mktemp("runs")
    assert main(tiny_args(corpus, cache, root / "done", "--steps", "4")) == 0
    assert main(tiny_args(corpus, cache, root / "half", "--steps", "4", "--stop-at", "2")) == 0
    return root


def test_resuming_a_finished_run_touches_nothing(finished, corpus, cache, capsys):  # noqa: F811
    out = finished / "done"
    before = _files(out)
    assert main(tiny_args(corpus, cache, out, "--steps", "4", "--resume")) == 0
    assert "is complete (step_00000004); pass a larger --steps" in capsys.readouterr().err
    assert _files(out) == before


@pytest.mark.parametrize("extra, message", [
    (["--steps", "3"], "is at step 4, past --steps 3"),
    (["--steps", "8", "--stop-at", "4"], "--stop-at 4 is not after the checkpoint's step 4"),
    (["--steps", "8", "--stop-at", "9"], "--stop-at 9 is beyond --steps 8"),
    (["--steps", "8", "--train.batch_size=3"], "another data stream (train.batch_size=4 there, 3 here)"),
    (["--steps", "8", "--seed", "7"], "another data stream (train.seed=0 there, 7 here)"),
    (["--steps", "8", "--data.seq_len=16"], "another data stream (data.seq_len=32 there, 16 here)"),
    (["--steps", "8", "--data.tokenizer=/nonexistent.json"], "another data stream (data.tokenizer=None there"),
], ids=["steps-behind", "stop-at-behind", "stop-at-beyond", "batch-size", "seed", "seq-len", "tokenizer"])
def test_resume_refuses_what_would_not_continue_the_run(finished, corpus, cache, capsys, extra, message):  # noqa: F811
    out = finished / "done"
    before = _files(out)
    assert main(tiny_args(corpus, cache, out, *extra, "--resume")) == 2
    assert message in _error_line(capsys)
    assert _files(out) == before


def test_resume_refuses_another_corpus(finished, corpus, cache, tmp_path, capsys):  # noqa: F811
    other = tmp_path / "other"
    other.mkdir()
    for doc in corpus.iterdir():  # the same files, one cut short: another content hash
        text = doc.read_text()
        (other / doc.name).write_text(text if doc.name != "doc0.txt" else text[:6000])
    out = finished / "done"
    before = _files(out)
    args = tiny_args(other, cache, out, "--steps", "8", "--resume")
    assert main(args) == 2
    assert "was trained on another corpus" in _error_line(capsys)
    assert _files(out) == before


def test_resume_with_another_lr_goes_on_and_says_so(finished, corpus, cache, capsys):  # noqa: F811
    assert main(tiny_args(corpus, cache, finished / "half", "--steps", "4", "--resume", "--optim.lr=1e-4")) == 0
    err = capsys.readouterr().err
    assert "resuming with other settings than the checkpoint's (optim.lr=" in err
    assert [p.name for p in checkpoint.checkpoint_dirs(finished / "half")][-1] == "step_00000004"


def test_a_signal_during_the_final_evaluation_keeps_the_final_checkpoint(corpus, cache, tmp_path, capsys,  # noqa: F811
                                                                         monkeypatch):
    def interrupted_evaluation(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the handler of the running block
        raise AssertionError("the signal did not interrupt the evaluation")

    monkeypatch.setattr(trainer, "evaluate", interrupted_evaluation)
    out = tmp_path / "run"
    assert main(tiny_args(corpus, cache, out, "--steps", "3", "--eval.every=0")) == 128 + signal.SIGTERM
    assert "SIGTERM during the final evaluation; training had finished" in capsys.readouterr().err
    (saved,) = checkpoint.checkpoint_dirs(out)
    state = json.loads((saved / "trainer_state.json").read_text())
    assert saved.name == "step_00000003" and state["reason"] == "final"


def test_host_out_of_memory_is_one_line(monkeypatch, capsys):
    def no_memory(cfg):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 51539607552 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(trainer, "train", no_memory)
    assert main(["--steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastlm-train: error: out of memory; lower --train.batch_size")

    def other_error(cfg):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(trainer, "train", other_error)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["--steps", "1"])


def _strict_json(line: str) -> dict:
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(line, parse_constant=refuse)


def test_skipped_steps_log_no_loss_and_metrics_stay_json(corpus, cache, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    args = tiny_args(corpus, cache, out, "--steps", "20", "--optim.lr=1e8", "--schedule.warmup_steps=0",
                     "--optim.grad_clip=0", "--train.log_every=1", "--train.max_nonfinite=2")
    with pytest.warns(UserWarning, match=r"step \d+: non-finite loss"):
        assert main(args) == 2
    assert "non-finite steps in a row" in _error_line(capsys)
    records = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("skipped")]
    assert skipped and all(r["loss"] is None for r in skipped)
    assert all(r["loss"] is not None for r in records if "loss" in r and not r.get("skipped"))


@pytest.mark.parametrize("damage", ["empty-config", "no-tokenizer"])
def test_a_damaged_checkpoint_is_one_line_and_untouched(corpus, cache, tmp_path, capsys, damage):  # noqa: F811
    out = tmp_path / "run"
    assert main(tiny_args(corpus, cache, out, "--steps", "2")) == 0
    saved = checkpoint.latest(out)
    if damage == "empty-config":
        (saved / "config.json").write_text("{}")
    else:
        (saved / "tokenizer.json").unlink()
    before = _files(out)
    assert main(tiny_args(corpus, cache, out, "--steps", "4", "--resume")) == 2
    line = _error_line(capsys)
    assert f"checkpoint {saved} is incomplete or corrupt" in line and "delete that directory" in line
    assert "--data.tokenizer" not in line
    assert _files(out) == before


def test_export_into_a_run_directory_is_refused(finished, corpus, cache, tmp_path, capsys):  # noqa: F811
    """config.json beside checkpoints/ would make --init-from and fastlm-generate read the export, not the run."""
    before = _files(finished / "done")
    assert main(tiny_args(corpus, cache, tmp_path / "new", "--steps", "2", "--export-hf", str(finished / "done"))) == 2
    assert "is a training run's directory; export into a directory of its own" in _error_line(capsys)
    assert _files(finished / "done") == before and not (tmp_path / "new").exists()
