"""A real browser (headless Chromium) calls Harmony from another origin (issue 12, defect 20).

The page is served from one loopback port, Harmony listens on another: two
origins, so Chromium sends a preflight for the Authorization header and hands
the answer to the page only if CORS allows it.  The endpoint with CORS lets
the page read the study list and an exposed header; the same request to an
endpoint without CORS is blocked by the browser, which is how every viewer
failed before.  Chromium is driven by Selenium with SE_OFFLINE=true (nothing
downloaded); scripts/test installs chromium and chromium-driver.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.browser import make_driver
from tests.harness import ECHO, MINIMAL_MAIN, http_pipeline, start_harmony, write_config


def pipelines(origin: str) -> str:
    """The same DICOMweb pipeline behind basic_auth at /dw (CORS for *origin*) and /plain (none)."""
    return (http_pipeline("dw", "/dw", "dw", "echo", ECHO, ["basic"], service="dicomweb",
                          options=f'[endpoints.dw.options.cors]\nallow_origins = ["{origin}"]')
            + http_pipeline("plain", "/plain", "plain", "echo", "", ["basic"], service="dicomweb")
            + '[middleware.basic]\ntype = "basic_auth"\nusername = "alice"\npassword_file = "pw"\n')

PAGE = """<!doctype html><html><head><title>waiting</title></head><body><script>
const auth = "Basic " + btoa("alice:secret");
async function call(path) {
  try {
    const r = await fetch(HARMONY + path, {headers: {"Authorization": auth, "Accept": "application/dicom+json"}});
    const body = await r.text();
    return {status: r.status, requestId: r.headers.get("X-Request-ID"), length: body.length};
  } catch (e) {
    return {blocked: String(e)};
  }
}
(async () => {
  const results = {cors: await call("/dw/studies?PatientID=P1"), plain: await call("/plain/studies?PatientID=P1")};
  document.title = "done " + JSON.stringify(results);
})();
</script></body></html>"""


class Page(Resource):
    isLeaf = True

    def __init__(self, html):
        super().__init__()
        self.html = html

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.html.encode()


def run_browser(url: str) -> dict:
    """Load *url* in headless Chromium and wait for the page's verdict (blocking: run in a thread).
    Its profile is a short folder of its own, removed after (tests.browser.make_driver: Chromium's
    sockets go inside it, and a socket's path must stay under 108 bytes)."""
    from selenium.webdriver.support.ui import WebDriverWait

    profile = Path(tempfile.mkdtemp(prefix="harmony-chromium-"))
    driver = make_driver(profile)
    try:
        driver.get(url)
        WebDriverWait(driver, 30).until(lambda d: d.title.startswith("done "))
        return json.loads(driver.title[len("done "):])
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_chromium_on_another_origin_reads_answers_only_where_cors_is_configured(tmp_path):
    page = Page("")
    port = reactor.listenTCP(0, Site(page), interface="127.0.0.1")
    origin = f"http://127.0.0.1:{port.getHost().port}"
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "pw").write_text("secret\n")
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"p": pipelines(origin)}))
    try:
        page.html = PAGE.replace("HARMONY", json.dumps(running.url("")))
        results = await threads.deferToThread(run_browser, origin + "/")
    finally:
        await running.stop()
        await port.stopListening()
    assert results["cors"]["status"] == 200, results
    assert len(results["cors"]["requestId"]) == 32  # an exposed header the page could read
    assert results["cors"]["length"] > 0
    assert "blocked" in results["plain"], results  # no CORS: the browser hides the answer
