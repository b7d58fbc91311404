"""A real Label Studio server on 127.0.0.1, for the review round-trip test.

Label Studio lives in its own virtualenv (``make label-studio``: it pins Django and boto ranges
that clash with ours), whose build also runs the first-start database migrations once into a
template data folder. :class:`LabelStudioServer` copies that folder into a temporary one (SQLite),
starts ``label-studio start`` on a free loopback port with version checks and analytics off,
waits for ``/health``, signs in the way a person would and takes a personal access token
(legacy tokens are off by default since 1.17), then calls the REST API with short-lived access
tokens refreshed from it. It stops the server by its own process group.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

USER_EMAIL = "curator@example.com"
USER_PASSWORD = "curation-test-password"  # test-only user of a loopback server
DEFAULT_VENV = os.path.join(os.path.dirname(__file__), "..", ".venv-label-studio")
STARTED = re.compile(r"Starting development server at http://([\d.]+):(\d+)/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelStudioServer:
    """Label Studio, started from ``venv`` over a copy of its migrated ``template`` data folder.

    Args:
        venv: the virtualenv ``make label-studio`` builds (``.venv-label-studio``).
        timeout_s: how long to wait for the server to answer ``/health``.

    Attributes:
        url: ``http://127.0.0.1:PORT`` once started.
        host: the address the server reported it listens on (loopback only).
    """

    def __init__(self, venv: str = DEFAULT_VENV, *, timeout_s: float = 150.0):
        self.venv = os.path.abspath(venv)
        self.timeout_s = timeout_s
        self.url = ""
        self.host = ""
        self._process: subprocess.Popen | None = None
        self._folder = ""
        self._refresh = ""
        self._access = ""

    @property
    def available(self) -> bool:
        return os.path.exists(os.path.join(self.venv, ".installed"))

    def __enter__(self) -> "LabelStudioServer":
        if not self.available:
            raise RuntimeError(f"Label Studio is not installed at {self.venv}: run `make label-studio`")
        self._folder = tempfile.mkdtemp(prefix="curation-ls-")
        data = os.path.join(self._folder, "data")
        shutil.copytree(os.path.join(self.venv, "template"), data)
        env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": data, "LATEST_VERSION_CHECK": "false",
               "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
               "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": "/"}
        env.pop("VIRTUAL_ENV", None)
        self._log_path = os.path.join(self._folder, "server.log")
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen(
                [os.path.join(self.venv, "bin", "label-studio"), "start", "--no-browser",
                 "--internal-host", "127.0.0.1", "-p", str(_free_port()), "--data-dir", data,
                 "--username", USER_EMAIL, "--password", USER_PASSWORD, "--log-level", "WARNING"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_until_healthy()
            self._sign_in()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _log(self) -> str:
        with open(self._log_path, errors="replace") as fh:
            return fh.read()

    def _wait_until_healthy(self) -> None:
        import requests

        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"label-studio exited with {self._process.returncode}: {self._log()[-2000:]}")
            found = STARTED.search(self._log())
            if found:  # it may move to another port when the asked one was taken meanwhile
                self.host, port = found.group(1), int(found.group(2))
                self.url = f"http://127.0.0.1:{port}"
                try:
                    if requests.get(self.url + "/health", timeout=5).status_code == 200:
                        return
                except requests.RequestException:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"label-studio did not answer /health within {self.timeout_s:.0f}s: {self._log()[-2000:]}")

    def _sign_in(self) -> None:
        """Session sign-in, then a personal access token (a JWT refresh token) from /api/token/."""
        import requests

        session = requests.Session()
        session.get(self.url + "/user/login/", timeout=30)
        done = session.post(self.url + "/user/login/", timeout=30, allow_redirects=False,
                            data={"email": USER_EMAIL, "password": USER_PASSWORD,
                                  "csrfmiddlewaretoken": session.cookies.get("csrftoken")},
                            headers={"Referer": self.url + "/user/login/"})
        if done.status_code != 302:
            raise RuntimeError(f"label-studio sign-in: expected a redirect, got {done.status_code}")
        token = session.post(self.url + "/api/token/", timeout=30,
                             headers={"X-CSRFToken": session.cookies.get("csrftoken"), "Referer": self.url + "/"})
        if token.status_code != 201:
            raise RuntimeError(f"label-studio personal access token: {token.status_code} {token.text[:200]}")
        self._refresh = token.json()["token"]
        self._renew()

    def _renew(self) -> None:
        import requests

        done = requests.post(self.url + "/api/token/refresh/", json={"refresh": self._refresh}, timeout=30)
        done.raise_for_status()
        self._access = done.json()["access"]

    def api(self, method: str, path: str, **kwargs):
        """One REST call with the access token (renewed once on 401); returns the response."""
        import requests

        for attempt in range(2):
            response = requests.request(method, self.url + path, timeout=120,
                                        headers={"Authorization": f"Bearer {self._access}"}, **kwargs)
            if response.status_code == 401 and attempt == 0:
                self._renew()
                continue
            if response.status_code >= 400:
                raise RuntimeError(f"label-studio {method} {path}: {response.status_code} {response.text[:300]}")
            return response
        raise AssertionError("unreachable")

    def __exit__(self, *exc) -> None:
        if self._process is not None and self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGTERM)
                self._process.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._process.wait(timeout=15)
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
