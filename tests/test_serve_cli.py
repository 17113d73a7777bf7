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


def test_serve_refuses_a_schedule_that_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad cron expression exits 2 naming it (was Prefect's ValueError traceback); an interval
    below one second is refused (0 silently fell back to the 5-minute cron)."""
    assert main(["serve", "--cron", "every 5 minutes"]) == 2
    assert "atp serve: --cron 'every 5 minutes': Invalid cron string" in capsys.readouterr().err
    for interval in ("0", "-60"):
        with pytest.raises(SystemExit) as exited:
            main(["serve", "--interval", interval])
        assert exited.value.code == 2
        assert f"argument --interval: must be at least 1, got {interval}" in capsys.readouterr().err


def test_serve_refuses_a_source_without_a_contract(capsys: pytest.CaptureFixture[str]) -> None:
    """Every scheduled run would fail on it; the command says so before serving."""
    assert main(["serve", "--source", "nosuch"]) == 2
    assert "atp serve: no data contract 'nosuch'" in capsys.readouterr().err
