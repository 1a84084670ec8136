import json
import math

import pytest

from fastlm.train.metrics import MetricsLog

RECORDS = [
    {"step": 2, "loss": 5.25, "lr": 3e-4, "grad_norm": None, "tokens_per_s": 1234.5},
    {"step": 4, "loss": 4.75, "lr": 2e-4, "grad_norm": 0.5, "tokens_per_s": 1300.0},
    {"step": 4, "val_loss": 4.9, "val_ppl": math.exp(4.9)},
    {"summary": {"steps": 4, "val_loss": 4.9}},
]


def _write(tmp_path, tensorboard):
    metrics = MetricsLog(tmp_path, tensorboard)
    for record in RECORDS:
        metrics.log(record)
    metrics.close()


def test_jsonl_holds_every_record_in_order(tmp_path):
    _write(tmp_path, tensorboard=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == RECORDS
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_scalars_mirror_the_records(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write(tmp_path, tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars.keys() == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/ppl"}
    assert scalars["train/loss"] == [(2, 5.25), (4, 4.75)]
    assert scalars["train/grad_norm"] == [(4, 0.5)]  # None (no clipping at step 2) is not a number to plot
    assert scalars["val/loss"] == [(4, pytest.approx(4.9))]
