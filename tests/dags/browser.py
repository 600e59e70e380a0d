"""A real `airflow standalone` and a headless Chromium logged into it, for the UI tests."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator

from scripts.airflow_local import LocalAirflow
from tests.conftest import free_port


@contextlib.contextmanager
def standalone(home: Path, extra_env: dict[str, str] | None = None, port: int | None = None,
               dags: tuple[str, ...] = ("chunkflow_inference",)) -> Iterator[LocalAirflow]:
    """Airflow started in ``home``, its DAGs parsed and unpaused; stopped after, by process group."""
    local = LocalAirflow(home, port or free_port(), extra_env=extra_env)
    try:
        local.start()
        for dag_id in dags:
            local.wait_for_dag(dag_id)
        yield local
    finally:
        local.stop()


@contextlib.contextmanager
def logged_in_page(airflow: LocalAirflow, next_path: str = "/", height: int = 1100) -> Iterator:
    """A Playwright page of Debian's chromium, logged in with standalone's generated password."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is installed by `make test`"
    user, password = next(iter(json.loads(
        (airflow.home / "simple_auth_manager_passwords.json.generated").read_text()).items()))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": height})
            page.goto(f"{airflow.url}/auth/login?next={next_path.replace('/', '%2F')}", wait_until="networkidle")
            fields = page.locator("input")
            fields.nth(0).fill(user)
            fields.nth(1).fill(password)
            page.locator("button[type=submit]").click()
            page.wait_for_url(lambda url: "/auth/" not in url, timeout=60_000)
            page.wait_for_load_state("networkidle")
            yield page
        finally:
            browser.close()
