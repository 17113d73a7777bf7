"""`atp serve` refuses to run without a Prefect server, whose scheduler it needs."""

from __future__ import annotations

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli import main


def test_serve_without_a_prefect_server_exits_2_naming_the_fix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", "--interval", "60"]) == 2
    error = capsys.readouterr().err
    assert "prefect server start" in error and "PREFECT_API_URL" in error
