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
