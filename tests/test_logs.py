"""Unit tests of the log format (backend/logs.py): text by default, one JSON object per line
with LOG_FORMAT=json, ids as fields, noisy third-party loggers held at WARNING."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from backend.logs import FORMAT, JsonFormatter

REPO = Path(__file__).resolve().parents[1]


def record(message: str, *args, level=logging.INFO, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("backend.jobs", level, __file__, 1, message, args, exc_info)


def test_json_lines_carry_project_and_job_ids_as_fields():
    line = JsonFormatter().format(record("project=%s job=%s retrain %s", 12, "ab-3.c", "finished"))
    entry = json.loads(line)
    assert entry["message"] == "project=12 job=ab-3.c retrain finished"
    assert entry["project"] == "12" and entry["job"] == "ab-3.c"
    assert entry["level"] == "INFO" and entry["logger"] == "backend.jobs"
    assert isinstance(entry["pid"], int) and entry["time"]
    assert "\n" not in line


def test_json_keeps_a_message_without_ids_and_an_exception_on_one_line():
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        rec = record("no ids here", level=logging.ERROR, exc_info=sys.exc_info())
    line = JsonFormatter().format(rec)
    entry = json.loads(line)
    assert "project" not in entry and "job" not in entry
    assert "ValueError: bad" in entry["exception"] and "Traceback" in entry["exception"]
    assert "\n" not in line  # a log shipper reads one event per line


def _configure_and_log(log_format: str) -> str:
    code = (
        "import logging; from backend.logs import configure_logging; configure_logging('INFO'); "
        "configure_logging('INFO'); "  # twice: still one handler
        "logging.getLogger('backend.x').info('project=%s ready', 7); "
        "logging.getLogger('httpx').info('GET http://ls/api?token=secret'); "
        "logging.getLogger('httpx').warning('httpx warning')"
    )
    env = {"LOG_FORMAT": log_format, "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=60).stderr


def test_json_format_from_the_environment_and_quiet_third_party_loggers():
    lines = _configure_and_log("json").strip().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["message"] for e in entries] == ["project=7 ready", "httpx warning"]
    assert entries[0]["project"] == "7"


def test_text_format_is_the_default():
    lines = _configure_and_log("text").strip().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("backend.x: project=7 ready") and " INFO [" in lines[0]
    assert "token=secret" not in "".join(lines)
    assert FORMAT.startswith("%(asctime)s")
