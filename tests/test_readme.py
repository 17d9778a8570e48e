"""The README's configuration reference lists every setting, with its flag and environment variable."""

from __future__ import annotations

from pathlib import Path

from agent.config import SETTINGS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_configuration_reference() -> None:
    reference = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    for d in SETTINGS:
        row = next((r for r in rows if r.startswith(f"| `{d.name}` |")), None)
        assert row is not None, f"{d.name} is missing from the README's configuration reference"
        assert f"`{d.flag}`" in row and f"`{d.env}`" in row, row
    assert len(rows) == len(SETTINGS)
