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
