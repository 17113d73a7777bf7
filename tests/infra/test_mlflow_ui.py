"""The MLflow UI in a real browser: the champion alias and a run's plot render.

The real ingest and training flows register a tiny model as ``champion`` in a project store
(SQLite tracking store, local artifacts); a lean ``mlflow server`` (one worker, no job runner)
serves that store; headless Chromium, driven by Playwright, opens the registered model's page and
the run's artifact page. MLflow's UI is a JavaScript app: every check waits for the rendered
content. Chromium is Debian's ``chromium`` package (``.ci/run`` installs it when missing);
Playwright's own browser download is not used. Screenshots go to each test's tmp dir.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tasks.publish import TrainingSummary
from tests.infra.support import free_port, start, wait_healthy
from tests.infra.test_production_form import TINY, write_smd

BIN = Path(sys.executable).parent
MODEL = "ui-model"
WAIT_MS = 60_000  # the UI's first load fetches a 4 MB bundle; a loaded machine is slow
INSTALL_HINT = (
    "Chromium not found on PATH. The MLflow UI test drives Debian's chromium package: "
    "install it with `apt-get update && apt-get install -y chromium` (.ci/run does this in CI)."
)


@dataclass(frozen=True)
class Store:
    """A project store the training flow filled, and the training run's summary."""

    tracking_uri: str
    summary: TrainingSummary
    experiment_id: str


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, prefect_api: None) -> Iterator[Store]:
    """Ingest a small SMD layout and train a tiny model through the real flows: champion."""
    from mlflow.tracking import MlflowClient

    from flows.ingest import ingest_flow
    from flows.training import training_flow

    home = tmp_path_factory.mktemp("mlflow-ui")
    write_smd(home / "smd")
    tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
    env = {
        "ATP_HOME": str(home / "atp"),
        "ATP_WAREHOUSE_URL": f"sqlite:///{home / 'warehouse.db'}",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "ATP_MODEL_NAME": MODEL,
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
        ingest_flow(str(home / "smd"), kind="smd")
        summary = training_flow(TINY)
        run = MlflowClient(tracking_uri).get_run(summary.run_id)
        yield Store(tracking_uri, summary, run.info.experiment_id)


@pytest.fixture(scope="module")
def mlflow_ui(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on the store, lean: one worker, no job runner."""
    logs = tmp_path_factory.mktemp("mlflow-ui-logs")
    port = free_port()
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1", "--backend-store-uri", store.tracking_uri]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = start("mlflow-ui", command, env, logs)
    try:
        wait_healthy(server, f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module", autouse=True)
def chromium() -> str:
    """Debian's Chromium, looked up first: when it is missing the tests fail at once, never skip."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return path


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    """Headless Chromium through Playwright."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    yield context.new_page()
    context.close()


def test_registered_model_page_shows_the_champion_alias(
    mlflow_ui: str, store: Store, page: Page, tmp_path: Path
) -> None:
    page.goto(f"{mlflow_ui}/#/models/{MODEL}")
    expect(page.get_by_role("heading", name=MODEL)).to_be_visible()
    version = page.get_by_role("link", name=f"Version {store.summary.version}", exact=True)
    row = page.get_by_role("row").filter(has=version)
    expect(row.get_by_role("status", name="champion", exact=True)).to_have_text("@ champion")
    page.screenshot(path=tmp_path / "registered-model.png", full_page=True)


def test_run_artifact_page_renders_a_plot_and_the_data_docs(
    mlflow_ui: str, store: Store, page: Page, tmp_path: Path
) -> None:
    run = f"{mlflow_ui}/#/experiments/{store.experiment_id}/runs/{store.summary.run_id}"
    page.goto(f"{run}/artifacts")
    page.get_by_text("figures", exact=True).click()
    page.get_by_text("scores-000.png", exact=True).click()
    plot = page.get_by_role("img", name="figures/scores-000.png")
    expect(plot).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=plot.element_handle())
    assert plot.evaluate("img => img.naturalWidth") > 200  # the PNG decoded, not a broken icon
    page.screenshot(path=tmp_path / "run-plot.png", full_page=True)

    page.get_by_text("data_docs", exact=True).click()
    page.get_by_text("-smd-passed-").click()  # the training range's validation page
    preview = page.frame_locator("main iframe").locator("body")
    expect(preview).to_contain_text("Data contract smd v1 on smd_readings (training range)")
    expect(preview).to_contain_text("Expectation Validation Result")
    page.screenshot(path=tmp_path / "run-data-docs.png", full_page=True)
