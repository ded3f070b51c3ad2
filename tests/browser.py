"""Headless Chromium from Debian driven by selenium, for tests on the reactor.

Selenium blocks, the reactor must not: every browser call runs in a thread
pool of its own (one thread: a WebDriver session is not thread-safe) and is
awaited as a Deferred, so Harmony keeps serving in-process while the
browser waits on it.  Selenium Manager is kept offline (``SE_OFFLINE``) and
the driver is Debian's ``/usr/bin/chromedriver``; a missing browser is a
failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor, threads
from twisted.python.threadpool import ThreadPool

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")


def make_driver(profile: Path):
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.path.exists(path), f"{path} is missing: apt-get install chromium chromium-driver (scripts/test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Chromium makes its singleton-socket folders (org.chromium.Chromium.*) in TMPDIR: inside the
    # profile, they go when the profile does (they were left in /tmp, one per browser session).
    scratch = profile / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    service = Service(executable_path=CHROMEDRIVER, env={**os.environ, "TMPDIR": str(scratch)})
    return webdriver.Chrome(service=service, options=options)


class Browser:
    """A Chromium session whose calls are awaited from the reactor thread."""

    def __init__(self):
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="browser")
        self.profile = Path(tempfile.mkdtemp(prefix="harmony-chromium-"))
        self.driver = None

    async def start(self):
        self.pool.start()
        self.driver = await self.run(make_driver, self.profile)
        return self

    def run(self, fn, *args, **kwargs):
        return threads.deferToThreadPool(reactor, self.pool, fn, *args, **kwargs)

    async def get(self, url):
        return await self.run(self.driver.get, url)

    async def wait(self, condition, timeout=20.0, message=""):
        """Poll *condition(driver)* in the browser thread until it is truthy (selenium's WebDriverWait)."""
        from selenium.webdriver.support.ui import WebDriverWait

        def until():
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(condition, message)
        return await self.run(until)

    async def css(self, selector):
        from selenium.webdriver.common.by import By
        return await self.run(self.driver.find_element, By.CSS_SELECTOR, selector)

    async def css_all(self, selector):
        from selenium.webdriver.common.by import By
        return await self.run(self.driver.find_elements, By.CSS_SELECTOR, selector)

    async def script(self, js, *args):
        return await self.run(self.driver.execute_script, js, *args)

    async def async_script(self, js, *args):
        return await self.run(self.driver.execute_async_script, js, *args)

    async def screenshot(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        return await self.run(self.driver.save_screenshot, str(path))

    async def stop(self):
        try:
            if self.driver is not None:
                await self.run(self.driver.quit)
        finally:
            self.pool.stop()
            shutil.rmtree(self.profile, ignore_errors=True)
