"""The console in a real browser: Debian's Chromium, headless, driven by Playwright.

Modules that use it skip themselves (``require_browser``) where Playwright or Chromium is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def require_browser() -> Any:
    """Playwright's sync API; skips the calling module where it or Chromium is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)
    return sync_api


@contextmanager
def console_page(url: str, admin_key: str = "") -> Iterator[Any]:
    """A page on the gateway's console at ``url`` (1280x800), signed in with ``admin_key`` when given."""
    sync_api = require_browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            if admin_key:
                page.fill("#admin-key", admin_key)
                page.dispatch_event("#admin-key", "change")
            yield page
        finally:
            browser.close()


def send_prompt(page: Any, prompt: str, max_tokens: int = 48) -> None:
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", str(max_tokens))
    page.click("#send")
