"""README must not drift from the code: its Quick start from CI, its op table from fastlm's exports."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands():
    assert len(quick_start_lines()) == 2


def test_ci_runs_the_quick_start_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start_lines()[1] in ci_lines


def test_every_op_in_the_readme_table_is_exported():
    import fastlm

    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `")]
    names = {name for row in rows for name in re.findall(r"`([a-z_]+)\(", row.split("|")[1])}
    assert {"rms_norm", "attention", "gemm", "linear", "linear_cross_entropy"} <= names  # the table was parsed
    missing = sorted(name for name in names if not callable(getattr(fastlm, name, None)) or name not in fastlm.__all__)
    assert not missing, f"in README's op table but not exported from fastlm: {missing}"
