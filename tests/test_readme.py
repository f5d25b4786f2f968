"""The README's settings table is the one the code generates."""

from __future__ import annotations

from pathlib import Path

from pipeline.worker.settings import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_worker_settings_table_matches_the_code():
    text = README.read_text()
    start = text.index("<!-- settings-table:start -->") + len("<!-- settings-table:start -->")
    end = text.index("<!-- settings-table:end -->")
    assert text[start:end].strip() == settings_table().strip()
