"""fastlm-train's configuration layers: what a --config file or a flag may set, and how a mistake in one
is reported."""

import pytest

from fastlm.train.config import UserError, presets, resolve
from fastlm.train.trainer import lr_factor


@pytest.mark.parametrize("key, value, instead", [("vocab_size", "100", "--data.vocab_size"),
                                                 ("causal", "false", "--objective")])
def test_derived_model_fields_cannot_be_set(key, value, instead, tmp_path):
    """model.vocab_size follows the tokenizer and model.causal the objective: a value set for them would be
    replaced without a word, so it is refused, from a flag or a --config file."""
    with pytest.raises(UserError, match=f"--model.{key}={value}: model.{key} .*; set {instead} instead"):
        resolve("tiny", None, [(f"model.{key}", value)])
    toml = tmp_path / "c.toml"
    toml.write_text(f"[model]\n{key} = {value}\n")
    with pytest.raises(UserError, match=f"{toml}: model.{key} .*; set {instead} instead"):
        resolve("tiny", str(toml), [])


def test_every_preset_resolves():
    for preset in presets():
        resolve(preset, None, [])


@pytest.mark.parametrize("text, message", [
    ("steps = 3\n", r"top-level key 'steps' \(outside any \[section\]\); put it under \[train\]$"),
    ("every = 3\n[train]\nsteps = 3\n", r"top-level key 'every' .*; put it under \[eval\] or \[checkpoint\]"),
    ("stepz = 3\n", r"top-level key 'stepz' .*; keys go under a section such as \[train\]"),
], ids=["one-owner", "two-owners", "unknown"])
def test_a_top_level_key_is_not_called_a_section(text, message, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    with pytest.raises(UserError, match=message) as err:
        resolve("tiny", str(toml), [])
    assert "unknown section" not in str(err.value)


def test_exponential_schedule_to_zero_decays_linearly():
    """As the schedule's docstring says: floor ** progress cannot reach 0, so min_lr_ratio = 0 decays linearly."""
    overrides = [("schedule.min_lr_ratio", "0"), ("schedule.warmup_steps", "10")]
    exponential = resolve("tiny", None, [("schedule.kind", "exponential"), *overrides]).schedule
    linear = resolve("tiny", None, [("schedule.kind", "linear"), *overrides]).schedule
    factors = [lr_factor(step, 110, exponential) for step in range(110)]
    assert factors == [lr_factor(step, 110, linear) for step in range(110)]
    assert factors[10] == 1.0 and factors[-1] == 0.0
