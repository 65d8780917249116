"""Run a real Label Studio 1.23.2 for the test suite and the bench scripts.

Usage::

    from tests.support.label_studio import LabelStudioServer, ensure_installed

    with LabelStudioServer(Path("/some/data/dir")) as ls:      # starts, waits for /health
        client = LabelStudio(base_url=ls.url, api_key=ls.api_key)
        client.users.whoami()

* Label Studio lives in its own virtualenv (default ``~/.cache/atl-backend/ls-1.23.2``,
  override with ``LS_VENV``); :func:`ensure_installed` creates it on first use (several
  minutes, about 1 GB), guarded by a file lock so parallel processes install only once.
* The server runs ``label-studio start`` with a SQLite database in ``data_dir``; an existing
  ``data_dir`` is reused (migrations are then already applied, so the start is much faster).
* :attr:`LabelStudioServer.api_key` is a personal access token (a full JWT refresh token)
  for the admin user, minted through ``manage.py shell`` and cached in ``data_dir``.

Only the standard library is used here, so this module works from any interpreter.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

LS_VERSION = "1.23.2"
DEFAULT_VENV = Path.home() / ".cache" / "atl-backend" / f"ls-{LS_VERSION}"

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "atl-test-password"
# Fixed so that a token minted in one process (manage.py shell) is valid in the server,
# and stays valid across restarts on the same data dir. Test-only; never used in production.
SECRET_KEY = "atl-backend-tests-only-not-a-secret-0123456789abcdefghijklmnopqrstuv"

LOG_NAME = "ls-server.log"
PID_NAME = "ls-server.pid"
LOCK_NAME = "ls-server.lock"
TOKEN_NAME = "ls-api-token.txt"

_STOP_GRACE_S = 20.0


def _log(msg: str) -> None:
    print(f"[label-studio harness] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- install


def default_venv_dir() -> Path:
    env = os.environ.get("LS_VENV")
    return Path(env).expanduser() if env else DEFAULT_VENV


@contextlib.contextmanager
def _file_lock(path: Path, blocking: bool = True) -> Iterator[IO[str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        fcntl.flock(fh.fileno(), flags)
        yield fh
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def _installed(venv: Path) -> bool:
    return (venv / "bin" / "label-studio").exists()


def _run_streaming(cmd: list[str], prefix: str) -> None:
    _log(f"$ {' '.join(cmd)}")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")},
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        # pip prints one "Location ... is ignored" warning per package for local indexes
        if not line or "is ignored: it is neither a file nor a directory" in line:
            continue
        tail = (tail + [line])[-40:]
        print(f"[{prefix}] {line}", file=sys.stderr, flush=True)
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {rc}:\n" + "\n".join(tail))


def ensure_installed(venv_dir: Path | str | None = None) -> Path:
    """Make sure ``<venv>/bin/label-studio`` exists (install label-studio==1.23.2 if not).

    Returns the venv path. Safe to call from several processes at once (fcntl lock).
    """
    venv = Path(venv_dir).expanduser() if venv_dir else default_venv_dir()
    venv = venv.absolute()
    if _installed(venv):
        return venv
    lock_path = venv.parent / f".{venv.name}.install.lock"
    _log(f"waiting for install lock {lock_path}")
    with _file_lock(lock_path):
        if _installed(venv):  # another process finished it while we waited
            return venv
        started = time.monotonic()
        _log(f"installing label-studio=={LS_VERSION} into {venv} (takes several minutes)")
        if not (venv / "bin" / "python").exists():
            _run_streaming([sys.executable, "-m", "venv", str(venv)], "venv")
        _run_streaming(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--upgrade", "pip"], "pip"
        )
        _run_streaming(
            [str(venv / "bin" / "python"), "-m", "pip", "install", f"label-studio=={LS_VERSION}"],
            "pip",
        )
        if not _installed(venv):
            raise RuntimeError(f"pip finished but {venv}/bin/label-studio is missing")
        _log(f"label-studio installed in {time.monotonic() - started:.0f} s")
    return venv


# --------------------------------------------------------------------------- server


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pgid_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_group(
    pgid: int, proc: subprocess.Popen[bytes] | None = None, grace: float = _STOP_GRACE_S
) -> None:
    """SIGTERM the process group, SIGKILL it if still alive after ``grace`` seconds.

    ``proc`` (the group leader, if it is our child) is reaped while waiting: an unreaped
    zombie would keep the group "alive" for killpg(pgid, 0).
    """

    def alive() -> bool:
        if proc is not None:
            proc.poll()
        return _pgid_alive(pgid)

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and alive():
        time.sleep(0.1)
    if alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    return "\n".join(lines[-n:])


class LabelStudioServer:
    """A real Label Studio process on 127.0.0.1, usable as a context manager."""

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        *,
        venv_dir: Path | str | None = None,
        host: str = "127.0.0.1",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.port = port if port is not None else free_port()
        self.host = host  # address Label Studio binds to
        self.venv_dir = Path(venv_dir).expanduser().absolute() if venv_dir else None
        self.extra_env = dict(extra_env or {})
        self.username = ADMIN_EMAIL
        self.password = ADMIN_PASSWORD
        self.log_path = self.data_dir / LOG_NAME
        self.proc: subprocess.Popen[bytes] | None = None
        self._api_key: str | None = None
        self._lock_fh: IO[str] | None = None
        self._log_fh: IO[bytes] | None = None

    # ---- public API

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str:
        """Personal access token (full JWT refresh token) of the admin user; cached."""
        if self._api_key is None:
            self._api_key = self._load_or_mint_token()
        return self._api_key

    def start(self, timeout: float = 600) -> LabelStudioServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        venv = ensure_installed(self.venv_dir)
        self.venv_dir = venv
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_data_dir()
        try:
            self._reap_stale_server()
            if _port_in_use(self.port):
                raise RuntimeError(f"port {self.port} is already in use")
            fresh = not (self.data_dir / "label_studio.sqlite3").exists()
            cmd = [
                str(venv / "bin" / "label-studio"),
                "start",
                "--no-browser",
                "--port", str(self.port),
                "--internal-host", self.host,
                "--username", self.username,
                "--password", self.password,
            ]
            self._log_fh = open(self.log_path, "wb")
            _log(
                f"starting Label Studio on {self.url} (data {self.data_dir}, "
                f"{'first start: migrations take ~2 min' if fresh else 'reusing data dir'})"
            )
            started = time.monotonic()
            self.proc = subprocess.Popen(
                cmd,
                cwd=str(self.data_dir),
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() kills the whole group
                # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only use it
                # from the main thread; otherwise rely on stop()/atexit/stale-server reaping.
                preexec_fn=(
                    _die_with_parent if threading.current_thread() is threading.main_thread() else None
                ),
            )
            (self.data_dir / PID_NAME).write_text(str(self.proc.pid))
            atexit.register(self.stop)
            self._wait_healthy(timeout, started)
            _log(f"Label Studio is UP on {self.url} after {time.monotonic() - started:.1f} s")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            _kill_group(proc.pid, proc)
            with contextlib.suppress(OSError):
                (self.data_dir / PID_NAME).unlink()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if self._lock_fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        return _tail(self.log_path, n)

    # ---- internals

    def _env(self) -> dict[str, str]:
        # Do not leak the caller's Label Studio / Django / venv settings into the server
        # (LS reads every setting X from LABEL_STUDIO_X, HEARTEX_X or X).
        drop_prefixes = ("LABEL_STUDIO_", "HEARTEX_", "DJANGO_")
        drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PORT", "HOST", "DEBUG", "DATABASE_NAME"}
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes) and k not in drop
        }
        assert self.venv_dir is not None
        env["PATH"] = f"{self.venv_dir / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env.update(
            {
                "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
                "DJANGO_DB": "sqlite",
                "SECRET_KEY": SECRET_KEY,
                "LABEL_STUDIO_USERNAME": self.username,
                "LABEL_STUDIO_PASSWORD": self.password,
                # let LS call an ML backend / webhook receiver on 127.0.0.1
                "ML_BLOCK_LOCAL_IP": "false",
                "SSRF_PROTECTION_ENABLED": "false",
                # Local Storage (/data/local-files/?d=...) under <data dir>/mydata, for the
                # image-fetching tests; said outright rather than left to the start directory.
                "LOCAL_FILES_SERVING_ENABLED": "true",
                "LOCAL_FILES_DOCUMENT_ROOT": str(self.data_dir),
                # no phoning home: PyPI version check, usage analytics, Sentry
                "LATEST_VERSION_CHECK": "false",
                "COLLECT_ANALYTICS": "false",
                "SENTRY_DSN": "",
                "FRONTEND_SENTRY_DSN": "",
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def _acquire_data_dir(self) -> None:
        """Hold an exclusive lock on the data dir while the server runs (SQLite, one server)."""
        if self._lock_fh is not None:
            return
        fh = open(self.data_dir / LOCK_NAME, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RuntimeError(
                f"{self.data_dir} is used by another running LabelStudioServer; "
                "use a different data_dir"
            ) from None
        self._lock_fh = fh

    def _reap_stale_server(self) -> None:
        """A server left behind by a harness process that died without stop() (we hold the lock now)."""
        pid_file = self.data_dir / PID_NAME
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if _pgid_alive(pid) and "label-studio" in _cmdline(pid):
            _log(f"stopping stale Label Studio (pgid {pid}) left on {self.data_dir}")
            _kill_group(pid)
        with contextlib.suppress(OSError):
            pid_file.unlink()

    def _wait_healthy(self, timeout: float, started: float) -> None:
        assert self.proc is not None
        deadline = started + timeout
        last_err = ""
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"Label Studio exited with code {rc} before becoming healthy; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if b"is in use." in self.log_path.read_bytes()[-4096:]:
                raise RuntimeError(
                    f"Label Studio found port {self.port} busy and moved to another one:\n"
                    + self.log_tail()
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    body = json.loads(resp.read().decode() or "{}")
                if body.get("status") == "UP":
                    return
                last_err = f"/health said {body!r}"
            except (OSError, ValueError) as e:
                last_err = repr(e)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Label Studio not healthy on {self.url} after {timeout:.0f} s ({last_err}); "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def _token_works(self, token: str) -> bool:
        req = urllib.request.Request(
            f"{self.url}/api/token/refresh",
            data=json.dumps({"refresh": token}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return bool(json.loads(resp.read()).get("access"))
        except (OSError, ValueError):
            return False

    def _load_or_mint_token(self) -> str:
        token_file = self.data_dir / TOKEN_NAME
        if token_file.exists():
            token = token_file.read_text().strip()
            if token and self._token_works(token):
                return token
        token = self._mint_token()
        token_file.write_text(token + "\n")
        with contextlib.suppress(OSError):
            token_file.chmod(0o600)
        return token

    def _mint_token(self) -> str:
        venv = ensure_installed(self.venv_dir)
        py = venv / "bin" / "python"
        ls_pkg = subprocess.run(
            [str(py), "-c", "import label_studio, os; print(os.path.dirname(label_studio.__file__))"],
            capture_output=True, text=True, check=True, env=self._env(),
        ).stdout.strip()
        code = (
            "from jwt_auth.models import LSAPIToken\n"
            "from users.models import User\n"
            f"u = User.objects.get(email={self.username!r})\n"
            "print('ATL_TOKEN=' + LSAPIToken.for_user(u).get_full_jwt())\n"
        )
        env = self._env()
        env["DJANGO_SETTINGS_MODULE"] = "core.settings.label_studio"
        res = subprocess.run(
            [str(py), os.path.join(ls_pkg, "manage.py"), "shell", "-c", code],
            capture_output=True, text=True, env=env, cwd=ls_pkg, timeout=300,
        )
        for line in res.stdout.splitlines():
            if line.startswith("ATL_TOKEN="):
                return line[len("ATL_TOKEN="):].strip()
        raise RuntimeError(
            f"could not mint a Label Studio token (exit {res.returncode}):\n"
            f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM the server if the harness process dies without stop()."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
