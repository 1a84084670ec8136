"""fastlm-generate: a checkpoint written by fastlm-train's checkpoint module (or a run directory,
whose newest checkpoint is used, or a Hugging Face directory written by hf_convert) generates
what ``fastlm.generate`` does; one prompt streams, a prompts file gives JSON lines; bad input
ends with one line and exit code 2."""

import json
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm.generate_cli import main
from fastlm.models import ModelConfig, Transformer, hf_convert
from fastlm.train import checkpoint
from tests.test_generate import SMALL, _model, tokenizer  # noqa: F401 (tokenizer is a fixture)


def _save(out, step, model, tok):
    optimizer = torch.optim.AdamW(model.parameters())
    return checkpoint.save(out, step, model, optimizer, {"model": model.cfg.to_dict()}, tok.to_str(),
                           {"micro_batch": 0, "tokens_seen": 0}, keep_last=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):  # noqa: F811
    """A run directory with two checkpoints of different weights; returns (dir, {step: model})."""
    out = tmp_path_factory.mktemp("run")
    models = {}
    for step, seed in ((1, 1), (3, 3)):
        torch.manual_seed(seed)
        models[step] = Transformer(ModelConfig.llama(n_heads=4, n_kv_heads=2, **{**SMALL, "vocab_size": 320})).eval()
        _save(out, step, models[step], tokenizer)
    return out, models


class _Recorder:
    """Stands in for sys.stdout and keeps every write: streaming means many writes."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_one_prompt_streams_from_the_newest_checkpoint(run, tokenizer, monkeypatch):  # noqa: F811
    out, models = run
    expected = fastlm.generate(models[3], tokenizer, "KING.", max_new_tokens=8, temperature=0)[0]
    recorder = _Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    assert main(["--checkpoint", str(out), "--prompt", "KING.", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert "".join(recorder.writes) == "KING." + expected + "\n"
    assert len(recorder.writes) > 2, "the text came out in one piece, not streamed"


def test_prompts_file_gives_json_lines(run, tokenizer, tmp_path, capsys):  # noqa: F811
    out, models = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\n\nKING.\n")
    step1 = out / "checkpoints" / "step_00000001"
    opts = ["--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "5"]
    assert main(["--checkpoint", str(step1), "--prompts-file", str(prompts), *opts]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = fastlm.generate(models[1], tokenizer, ["To be", "KING."], max_new_tokens=6, temperature=0.9, top_k=20,
                               top_p=0.9, seed=5)
    assert lines == [{"prompt": "To be", "completion": expected[0]}, {"prompt": "KING.", "completion": expected[1]}]


def test_default_length_fits_the_context_and_lines_split_at_newlines_only(run, tokenizer, tmp_path, capsys):  # noqa: F811
    """The documented commands give no --max-new-tokens: the default (128) shrinks to the room a 40-token
    context leaves. A form feed or U+2028 inside a line does not start another prompt."""
    out, models = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be\x0cor not\r\nKING.\u2028Now\n")
    assert main(["--checkpoint", str(out), "--prompts-file", str(prompts), "--temperature", "0"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    texts = ["To be\x0cor not", "KING.\u2028Now"]
    expected = fastlm.generate(models[3], tokenizer, texts, temperature=0)
    assert [line["prompt"] for line in lines] == texts
    assert [line["completion"] for line in lines] == expected


def test_hugging_face_directory(run, tokenizer, tmp_path, capsys):  # noqa: F811
    """An HF directory (hf_convert.save_hf) generates what the fastlm model it came from does."""
    _, models = run
    hf_dir = hf_convert.save_hf(models[3], tokenizer, tmp_path / "hf")
    expected = fastlm.generate(models[3], tokenizer, "To be", max_new_tokens=8, temperature=0)[0]
    assert main(["--checkpoint", str(hf_dir), "--prompt", "To be", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "To be" + expected + "\n"


def test_runs_as_a_command(run):
    out, _ = run
    result = subprocess.run([sys.executable, "-m", "fastlm.generate_cli", "--checkpoint", str(out), "--prompt", "To be",
                             "--max-new-tokens", "4", "--seed", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("To be")


@pytest.fixture(scope="module")
def mlm_checkpoint(tmp_path_factory, tokenizer):  # noqa: F811
    out = tmp_path_factory.mktemp("mlm")
    return _save(out, 1, Transformer(ModelConfig.bert(n_heads=4, **{**SMALL, "vocab_size": 320})), tokenizer)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("empty-dir", "neither a fastlm checkpoint"),
    ("mlm", "is a masked LM"),
    ("empty-prompts-file", "holds no prompt"),
    ("too-long", "exceeds the model's context of 40 tokens"),
    ("bad-top-p", "top_p must be in"),
    ("bad-device", "is not a device fastlm runs on"),
])
def test_bad_input_is_one_line_and_exit_2(case, message, run, mlm_checkpoint, tmp_path, capsys):
    out, _ = run
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "empty-dir").mkdir()
    args = {
        "missing": ["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"],
        "empty-dir": ["--checkpoint", str(tmp_path / "empty-dir"), "--prompt", "x"],
        "mlm": ["--checkpoint", str(mlm_checkpoint), "--prompt", "x"],
        "empty-prompts-file": ["--checkpoint", str(out), "--prompts-file", str(tmp_path / "empty.txt")],
        "too-long": ["--checkpoint", str(out), "--prompt", "x", "--max-new-tokens", "100"],
        "bad-top-p": ["--checkpoint", str(out), "--prompt", "x", "--top-p", "0"],
        "bad-device": ["--checkpoint", str(out), "--prompt", "x", "--device", "tpu"],
    }[case]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "", "output was printed before the error"
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastlm-generate: error: ") and message in err[0], err
