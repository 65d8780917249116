import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def services(tmp_path):
    """A real redis-server, started; the web app and workers are started by the test."""
    from tests.support.services import Services

    with Services(tmp_path / "data") as s:
        s.start_redis()
        yield s


@pytest.fixture(scope="session")
def label_studio():
    """A real Label Studio 1.23.2 on loopback, installed into its own venv on first use.

    Its data directory (LS_DATA_DIR, default ~/.cache/atl-backend/ls-test-data) is kept
    between runs so later starts skip the migrations; each test makes its own project.
    """
    from tests.support.label_studio import LabelStudioServer

    data_dir = Path(os.environ.get("LS_DATA_DIR", Path.home() / ".cache" / "atl-backend" / "ls-test-data"))
    with LabelStudioServer(data_dir) as server:
        yield server


# Debian's chromium, driven by Playwright (its own browser download does not work offline).
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser():
    """A real headless Chromium; `make test` installs it (apt-get install chromium)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium "
                    f"(apt-get install -y chromium), or point CHROMIUM at a Chromium binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()
