"""Settings from environment variables and ``.env``, read on every call, never at import."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from tasks.errors import AtpError

QUIET_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


@dataclass(frozen=True)
class Settings:
    """Where state lives. Embedded defaults put everything under ``home``."""

    home: Path
    warehouse_url: str
    mlflow_tracking_uri: str
    model_name: str
    dask_address: str | None = None  # a running Dask scheduler for task_runner="dask"

    @property
    def artifact_root(self) -> Path:
        return self.home / "mlartifacts"


def read_dotenv(path: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` settings of a .env file, parsed by python-dotenv as Prefect parses the
    same file (quotes, ``export``, ``# comments`` after a value); keys without a value skipped."""
    if not path.is_file():
        return {}
    return {key: value for key, value in dotenv_values(path).items() if value is not None}


def _env() -> dict[str, str]:
    """``./.env`` under the environment's non-empty values (an empty one counts as unset)."""
    return {**read_dotenv(Path.cwd() / ".env"), **{k: v for k, v in os.environ.items() if v}}


def get_settings() -> Settings:
    """Resolve settings now from the environment (which wins) and ``./.env``, an empty value as
    unset; create the home.

    Raises:
        AtpError: the home cannot be created (a file is in the way, no permission).
    """
    env = _env()
    home = Path(env.get("ATP_HOME") or ".atp").expanduser().resolve()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AtpError(f"ATP_HOME {home} cannot be a state directory: {error.strerror}") from None
    return Settings(
        home=home,
        warehouse_url=env.get("ATP_WAREHOUSE_URL") or f"sqlite:///{home / 'warehouse.db'}",
        mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}",
        model_name=env.get("ATP_MODEL_NAME") or "anomaly-transformer",
        dask_address=env.get("ATP_DASK_ADDRESS") or None,
    )


def apply_quiet_defaults() -> None:
    """Switch telemetry off and lengthen Prefect's cold-start timeout unless the user chose."""
    env = _env()
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, env.get(key, value))
    if "MLFLOW_TRACKING_URI" in env:
        os.environ.setdefault("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
