"""Checkpoints that cannot be read back: a damaged file is reported as a corrupt checkpoint to delete
(the previous one is the way back), a readable one that does not fit the model as a mismatch, and
nothing in the checkpoint is changed by the attempt."""

from pathlib import Path

import pytest
import torch

from fastlm.models import ModelConfig, Transformer
from fastlm.train import checkpoint, main
from fastlm.train.config import UserError
from fastlm.train.trainer import param_groups
from tests.train.test_train import _error_line, cache, corpus, tiny_args  # noqa: F401 (fixtures)

CFG = ModelConfig.gpt2(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
REMEDY = "delete that directory so that --resume takes the previous checkpoint, or start fresh with another --out"
OTHER = "give another checkpoint (e.g. an earlier one in the same checkpoints/ directory)"  # not a resume


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a")).to_str()


def _model_and_optimizer(cfg=CFG):
    torch.manual_seed(0)
    model = Transformer(cfg)
    return model, torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)


@pytest.fixture
def saved(tmp_path) -> Path:
    """A checkpoint as fastlm-train writes it (its config has the model and optim sections)."""
    model, opt = _model_and_optimizer()
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    opt.step()
    config = {"model": CFG.to_dict(), "optim": {"name": "adamw"}}
    return checkpoint.save(tmp_path, 3, model, opt, config, _tokenizer_json(), {"micro_batch": 3, "tokens_seen": 0},
                           keep_last=0)


def _files(path: Path) -> dict:
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _truncate(size):
    def cut(file: Path):
        with open(file, "r+b") as f:
            f.truncate(size)
    return cut


CORRUPTIONS = {
    "truncated": _truncate(1000),
    "empty": _truncate(0),
    "missing": Path.unlink,
    "garbage": lambda file: file.write_bytes(bytes(range(256)) * 4),
}


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors"])
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_damaged_tensor_file_is_a_corrupt_checkpoint(name, how, saved):
    CORRUPTIONS[how](saved / name)
    before = _files(saved)
    with pytest.raises(UserError) as err:
        checkpoint.load(saved, *_model_and_optimizer())
    message = str(err.value)
    assert f"checkpoint {saved} is incomplete or corrupt ({name}: " in message and message.endswith(REMEDY)
    assert "does not match this model" not in message
    assert _files(saved) == before


@pytest.mark.parametrize("name", ["trainer_state.json", "optimizer.json"])
@pytest.mark.parametrize("content", [b"[]", b"{\"step\": ", b"\xff\xfe not utf-8"], ids=["list", "cut", "bytes"])
def test_a_damaged_json_file_is_a_corrupt_checkpoint(name, content, saved):
    (saved / name).write_bytes(content)
    before = _files(saved)
    with pytest.raises(UserError, match=f"incomplete or corrupt \\({name}: ") as err:
        checkpoint.load(saved, *_model_and_optimizer())
    assert str(err.value).endswith(REMEDY)
    assert _files(saved) == before


def test_a_readable_model_file_of_another_shape_does_not_match(saved):
    with pytest.raises(UserError, match="the checkpoint does not match this model: use the settings it was trained with"):
        checkpoint.load(saved, *_model_and_optimizer(CFG.replace(d_model=32)))


@pytest.mark.parametrize("content", [b"{}", b'{"model": {}}', b'{"model": {}, "optim": 3}', b'{"model": {}, "optim": {}, '
                                     b'"data": ["seq_len"]}', b"[]", b"\xff{"],
                         ids=["empty", "no-optim", "optim-not-a-table", "data-not-a-table", "list", "bytes"])
def test_read_config_rejects_an_unreadable_or_incomplete_config(content, saved):
    (saved / "config.json").write_bytes(content)
    with pytest.raises(UserError, match=r"incomplete or corrupt \(config.json: ") as err:
        checkpoint.read_config(saved)
    assert str(err.value).endswith(REMEDY)


def test_read_config_returns_the_saved_config(saved):
    assert checkpoint.read_config(saved) == {"model": CFG.to_dict(), "optim": {"name": "adamw"}}


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_a_damaged_tokenizer_is_a_corrupt_checkpoint(how, saved):
    CORRUPTIONS[how](saved / "tokenizer.json")
    readers = {"resume": lambda: checkpoint.read_tokenizer(saved),
               "init-from": lambda: checkpoint.resolve_pretrained(saved, load_weights=False).load_tokenizer(),
               "generate": lambda: checkpoint.load_pretrained_model(saved)}
    for what, read in readers.items():
        with pytest.raises(UserError, match=r"incomplete or corrupt \(tokenizer.json: ") as err:
            read()
        assert str(err.value).endswith(REMEDY if what == "resume" else OTHER), what
        assert "--data.tokenizer" not in str(err.value), what


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_checkpoint_opened_as_a_model_gets_no_resume_advice(how, saved):
    """fastlm-generate, hf_convert and --init-from open a checkpoint as a model: --resume is not theirs."""
    CORRUPTIONS[how](saved / "model.safetensors")
    for read in (lambda: checkpoint.load_pretrained_model(saved), lambda: checkpoint.resolve_pretrained(saved)):
        with pytest.raises(UserError, match=r"incomplete or corrupt \(model.safetensors: ") as err:
            read()
        assert str(err.value).endswith(OTHER) and "--resume" not in str(err.value)
    (saved / "config.json").write_text('{"optim": {}}')
    with pytest.raises(UserError, match=r"incomplete or corrupt \(config.json: ") as err:
        checkpoint.resolve_pretrained(saved, load_weights=False)
    assert "--resume" not in str(err.value)


def _rewrite_weights(saved, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(saved / "model.safetensors"))


@pytest.mark.parametrize("edit, detail", [
    (lambda t: t.pop("blocks.0.attn.qkv.weight"), "(no tensor blocks.0.attn.qkv.weight)"),
    (lambda t: t.update(extra=torch.zeros(2)), "(unexpected tensor extra)"),
    (lambda t: t.update({"pos_emb.weight": torch.zeros(4, 16)}), "(pos_emb.weight has shape (4, 16), the config needs (8, 16))"),
], ids=["missing", "unexpected", "shape"])
def test_weights_that_do_not_match_the_config_name_the_tensor(edit, detail, saved):
    _rewrite_weights(saved, edit)
    for read in (checkpoint.load_pretrained_model, checkpoint.resolve_pretrained):  # generate/hf_convert, --init-from
        with pytest.raises(UserError) as err:
            read(saved)
        assert str(err.value) == f"{saved}: the weights do not match its config {detail}"


def test_the_saved_tokenizer_loads(saved):
    assert checkpoint.read_tokenizer(saved).to_str() == _tokenizer_json()
    assert checkpoint.resolve_pretrained(saved).load_tokenizer().to_str() == _tokenizer_json()


def test_init_from_a_checkpoint_without_a_model_section_is_corrupt(saved):
    (saved / "config.json").write_text('{"optim": {}}')
    with pytest.raises(UserError, match=r"incomplete or corrupt \(config.json: "):
        checkpoint.resolve_pretrained(saved)


def test_resume_from_a_damaged_model_file_names_the_corruption(corpus, cache, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert main(tiny_args(corpus, cache, out, "--steps", "3")) == 0
    last = checkpoint.latest(out)
    _truncate(1000)(last / "model.safetensors")
    before = _files(out)
    assert main(tiny_args(corpus, cache, out, "--steps", "6", "--resume")) == 2
    line = _error_line(capsys)
    assert f"checkpoint {last} is incomplete or corrupt (model.safetensors: " in line and line.endswith(REMEDY)
    assert _files(out) == before
