"""The attention tile sweep and the prepared GPU session, checked without a GPU: a wrong label, a
kind missing from the committed compile sweep or a kind the session names that does not exist
would only show in a device window, which is too short and too rare to spend on them."""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "benchmarks/results/attention-tiles-sm90.jsonl"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("attention_tile_sweep", ROOT / "benchmarks/attention_tile_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["bwd_dkdv", "bwd_dkdv_dq", "bwd_dq", "fwd"])
@pytest.mark.parametrize("head_dim", [128, 64], ids=lambda d: f"d{d}")
def test_compile_step_finds_one_variant_built_with_the_candidate_tile(sweep, kind, head_dim):
    from fastlm.kernel_registry import REGISTRY

    spec = REGISTRY[f"fastlm.ops.attention.{sweep.KERNELS[kind]}"]
    label = f"bf16 d={head_dim} causal{sweep.LABEL_TAG.get(kind, '')}"
    tile = next(t for t in sweep.CANDIDATES[kind] if t != sweep.default_tile(kind, head_dim))
    with sweep.tiles(kind, tile):
        (variant,) = [v for v in spec.variants() if v.label == label]
    assert (variant.constexprs["BLOCK_M"], variant.constexprs["BLOCK_N"], variant.num_warps, variant.num_stages) == tile
    assert variant.constexprs.get("ACCUM_DQ", False) == (kind == "bwd_dkdv_dq")
    # Outside the block the launcher's own tiles are back.
    assert sweep.default_tile(kind, head_dim) != tile


def test_committed_compile_sweep_covers_every_kind_and_admits_the_defaults(sweep):
    admitted = sweep.admitted(str(COMPILED))
    for kind in sweep.KERNELS:
        for head_dim in sweep.HEAD_DIMS:
            assert (kind, head_dim, sweep.default_tile(kind, head_dim)) in admitted, (kind, head_dim)


def test_committed_compile_sweep_was_built_with_the_devices_triton(sweep):
    versions = {json.loads(line).get("triton") for line in COMPILED.read_text().splitlines()}
    assert versions and all(v and v.startswith(sweep.DEVICE_TRITON) for v in versions), versions


def test_unknown_kind_is_refused(sweep):
    assert sweep._kinds("bwd_dkdv,bwd_dkdv_dq") == ("bwd_dkdv", "bwd_dkdv_dq")
    assert sweep._kinds(None) == tuple(sweep.KERNELS)
    with pytest.raises(SystemExit, match="unknown kernel kinds"):
        sweep._kinds("bwd_dkdv,dkdv")


def test_gpu_session_script_parses_and_names_known_kinds(sweep):
    script = (ROOT / "benchmarks/gpu_session.sh").read_text()
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(ROOT / "benchmarks/gpu_session.sh")], check=True)
    (kinds,) = re.findall(r"attention-tiles-sm90\.jsonl (\S+)", script)
    assert set(kinds.split(",")) <= set(sweep.KERNELS)
    for path in re.findall(r"python3 (benchmarks/\S+\.py)", script):
        assert (ROOT / path).is_file(), path



def test_best_reports_the_fastest_checked_tile_against_the_default(sweep, tmp_path):
    timed = tmp_path / "tiles.jsonl"
    records = [
        {"kind": "bwd_dkdv", "head_dim": 128, "tile": [16, 128, 8, 2], "default": True, "ms": 2.0, "tflops": 100.0},
        {"kind": "bwd_dkdv", "head_dim": 128, "tile": [32, 64, 8, 2], "default": False, "ms": 1.6, "tflops": 125.0},
        # A failed check is never the fastest, however short its (absent) time.
        {"kind": "bwd_dkdv", "head_dim": 128, "tile": [64, 64, 8, 2], "default": False, "problem": "error"},
        {"kind": "fwd", "head_dim": 64, "tile": [128, 64, 8, 3], "default": False, "ms": 0.5, "tflops": 400.0},
    ]
    timed.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = sweep.best(str(timed))
    assert rows[2] == "| bwd_dkdv | 128 | (16, 128, 8, 2) | 2.000 | (32, 64, 8, 2) | 1.600 | 125 | 1.25x |"
    assert rows[3] == "| fwd | 64 | not timed | - | (128, 64, 8, 3) | 0.500 | 400 | - |"
    assert len(rows) == 4


def test_command_line_gives_help_and_dispatches_the_session_s_time_step(sweep, monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--help"])
    assert exit_info.value.code == 0 and "compile,time,best" in capsys.readouterr().out
    called = []
    monkeypatch.setattr(sweep, "time_sweep", lambda out, compiled, kinds: called.append((compiled, kinds)))
    # As benchmarks/gpu_session.sh calls it: time OUT COMPILED KINDS.
    sweep.main(["time", str(tmp_path / "t.jsonl"), "c.jsonl", "bwd_dkdv,bwd_dkdv_dq"])
    sweep.main(["time", str(tmp_path / "t.jsonl")])
    assert called == [("c.jsonl", ("bwd_dkdv", "bwd_dkdv_dq")), (None, tuple(sweep.KERNELS))]
