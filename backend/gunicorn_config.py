"""gunicorn settings of the web app: `gunicorn -c python:backend.gunicorn_config backend.wsgi:app`.

`make serve`, the Dockerfile and the tests all start gunicorn with this module; the command
line still sets workers, bind address and timeouts.

It exists for /metrics. prometheus_client's multiprocess mode keeps every worker's samples in
files under one directory (DATA_DIR/prometheus), and a scrape adds up the files of all
workers, the live ones and the ones that exited. So whichever worker answers a scrape, it
gives the same series and totals, and a restarted worker adds no new label values.
"""

from __future__ import annotations

import os
import shutil

from backend.settings import Settings

multiproc_dir = Settings.from_env().data_dir / "prometheus"
# Before anything imports prometheus_client: it picks its file-backed values at import time,
# and the workers, forked from this process, inherit the variable. Always ours, never a
# PROMETHEUS_MULTIPROC_DIR from the environment, because on_starting empties it.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)


def on_starting(server) -> None:
    """Start with an empty directory: files of an earlier run would add its counts to ours."""
    shutil.rmtree(multiproc_dir, ignore_errors=True)
    multiproc_dir.mkdir(parents=True)


def child_exit(server, worker) -> None:
    """A worker exited (it is restarted): drop its files of live gauges, keep its counts."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
