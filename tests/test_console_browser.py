"""The operator console in a real headless Chromium (Debian's, via selenium):
log in, watch a target go red when its upstream is killed and green when it
returns, replay a dead letter and see it delivered, find XSS payloads (a
patient name, a pipeline description) rendered as inert text, CSRF refused
without the token, inline script blocked by the CSP, reload from the
configuration page, the audit trail, logout.

A screenshot of every page is saved as a test artifact under the test's
tmp_path (the path is printed; pytest keeps the last three runs); with ``HARMONY_CONSOLE_SCREENSHOTS=DIR`` they are also copied to
DIR (``scripts/console-screenshots`` makes docs/console/ that way).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest_twisted
import treq

from tests.browser import Browser
from tests.console_support import TOKEN, XSS, ConsoleRig


def by_css(selector, *, text=None, cls=None, count=None):
    """A selenium wait condition: an element matching *selector* (with *text*
    in its rendered text and/or class *cls*), or *count* of them.  Checked in
    one script call, so a table re-rendered by a poll cannot go stale under it."""

    def check(driver):
        return driver.execute_script(
            "const [sel, text, cls, count] = arguments;"
            "const found = [...document.querySelectorAll(sel)];"
            "if (count !== null) return found.length >= count;"
            "return found.some(e => (text === null || e.innerText.includes(text))"
            " && (cls === null || e.classList.contains(cls)));", selector, text, cls, count)
    return check


async def element(b, selector, **kw):
    """Wait for *selector*, then the (stable, not re-rendered) element."""
    await b.wait(by_css(selector, **kw), message=f"no {selector}")
    return await b.css(selector)


async def text(b, selector) -> str:
    """An element's text, read in one call (polled pages re-render their tables)."""
    return await b.script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null", selector)


async def click(b, selector):
    """Click in one call, so a re-render between finding and clicking cannot go stale."""
    await b.wait(by_css(selector), message=f"nothing to click at {selector}")
    assert await b.script("const e = document.querySelector(arguments[0]); if (e) e.click(); return !!e", selector)


async def page(b, admin, name, ready_selector, **kw):
    await b.get(f"{admin}/ui/#/{name}")
    return await b.wait(by_css(ready_selector, **kw), message=f"{name} page: {ready_selector}")


@pytest_twisted.ensureDeferred
async def test_console_in_chromium(tmp_path):
    shots = tmp_path / "screenshots"  # pytest keeps the last few runs' tmp_path: the artifacts
    rig = await ConsoleRig(tmp_path).start()
    b = await Browser().start()
    admin = rig.admin()
    try:
        # -- login: a wrong token is refused on the page, the right one opens the console
        await b.get(f"{admin}/ui/")
        token_input = await element(b, "#login-token")
        await b.screenshot(shots / "login.png")
        await b.run(token_input.send_keys, "not-the-token-at-all")
        await b.run((await b.css("#login-submit")).click)
        await b.wait(by_css("#login-error", text="Wrong token."))
        await b.run(token_input.clear)
        await b.run(token_input.send_keys, TOKEN)
        await b.run((await b.css("#login-operator")).send_keys, "night-shift")
        await b.run((await b.css("#login-submit")).click)
        await b.wait(by_css(".pipeline-row[data-pipeline='lb'] svg .box.ok", count=2))
        assert "night-shift" in await text(b, "#who")
        # The session cookie is HttpOnly: page script cannot read it.
        assert "harmony_console" not in await b.script("return document.cookie")

        # -- overview: a pipeline description that is an XSS payload shows as text
        assert await text(b, ".pipeline-row[data-pipeline='lb'] h4 span") == XSS
        # ingest -> sf -> orthanc (its queue) -> the orthanc target, drawn
        assert await b.script("return [...document.querySelectorAll(\".pipeline-row[data-pipeline='ingest'] text\")]"
                              ".map(t => t.textContent)") == ["ingest", "sf", "orthanc (queued)", "orthanc"]
        assert await b.script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
        await b.screenshot(shots / "overview.png")

        # -- targets: red when the upstream dies, green when it returns
        await page(b, admin, "targets", "tr[data-target='pacs-a']", cls="state-ok")
        await rig.upstreams[0].kill()
        await b.wait(by_css("tr[data-target='pacs-a']", cls="state-bad"), message="pacs-a never went red")
        assert "unhealthy" in await text(b, "tr[data-target='pacs-a']")
        await b.screenshot(shots / "targets.png")
        rig.upstreams[0].start()  # the same port again
        await b.wait(by_css("tr[data-target='pacs-a']", cls="state-ok"), message="pacs-a never went green again")
        for _ in range(20):  # traffic for the charts
            await (await treq.get(rig.harmony.url("/api/x"))).content()

        # -- queues: the refused instance is a dead letter; replayed, it is delivered
        await page(b, admin, "queues", "tr[data-queue='orthanc']")
        await click(b, "tr[data-queue='orthanc'] button.show-dead")
        await b.wait(by_css(f"tr.dead-letter[data-sop='{rig.poison}']"))
        await b.screenshot(shots / "queues.png")
        rig.accept_poison = True
        await click(b, f"tr.dead-letter[data-sop='{rig.poison}'] button.retry-one")
        await b.wait(lambda d: d.execute_script(
            "const r = document.querySelector(\"tr[data-queue='orthanc']\");"
            "return r && r.cells[3].textContent === '4' && r.cells[4].textContent === '0'"),
            message="the replayed dead letter was never delivered")
        assert rig.target.stored[rig.poison] == 1

        # -- archive: the XSS patient name is text; thumbnails render
        await page(b, admin, "archive", "a.patient-name", text="DOE^JANE")
        names = await b.script("return [...document.querySelectorAll('a.patient-name')].map(a => a.textContent)")
        assert XSS in names, names
        assert await b.script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
        await b.screenshot(shots / "archive.png")
        assert await b.script("const a = [...document.querySelectorAll('a.patient-name')]"
                              ".find(e => e.textContent === 'DOE^JANE'); a.click(); return true")
        await click(b, "tr.study a")
        await b.wait(lambda d: d.execute_script(
            "const i = [...document.querySelectorAll('figure.thumb img')];"
            "return i.length === 3 && i.every(x => x.complete && x.naturalWidth > 0)"), message="thumbnails")
        await b.screenshot(shots / "archive-study.png")

        # -- send to target: the study goes to orthanc again, which refuses one instance again
        rig.accept_poison = False
        await click(b, "a.crumb-patient")
        await click(b, "tr.study button.send")
        await b.run((await element(b, "#confirm-ok")).click)
        await b.wait(by_css("#status", text="queued 3 instance(s) for orthanc"))
        await rig.forward.idle()

        # -- bulk purge by filter: only after typing the target's name in the confirmation
        await page(b, admin, "queues", "tr[data-queue='orthanc']")
        await click(b, "tr[data-queue='orthanc'] button.show-dead")
        await b.wait(by_css(f"tr.dead-letter[data-sop='{rig.poison}']"))
        await b.run((await b.css("#filter-error")).send_keys, "409")
        await click(b, "#dead-filters button[type=submit]")
        await b.wait(by_css("#purge-matching", text="Purge matching (1)"))
        for typed in ("orthan", "orthanc"):
            await click(b, "#purge-matching")
            await b.run((await element(b, "#confirm-typed")).send_keys, typed)
            await b.run((await b.css("#confirm-ok")).click)
            if typed == "orthan":  # a wrong name purges nothing
                await b.wait(lambda d: not d.execute_script("return document.getElementById('confirm').open"))
                assert len(await rig.forward.dead("orthanc")) == 1
        await b.wait(by_css("#status", text='"purged":1'))
        assert await rig.forward.dead("orthanc") == []

        # -- traffic: charts per pipeline, lines once two samples exist
        await page(b, admin, "traffic", ".traffic-pipeline[data-pipeline='lb'] svg.chart")
        for _ in range(30):  # while the page polls: a non-zero request rate appears on lb's chart
            await (await treq.get(rig.harmony.url("/api/x"))).content()
        await b.wait(lambda d: d.execute_script(
            "const l = document.querySelector(\".traffic-pipeline[data-pipeline='lb'] svg.chart polyline\");"
            "if (!l) return false; const p = l.getAttribute('points').split(' ');"
            "return p.length >= 2 && p.some(x => parseFloat(x.split(',')[1]) < 100)"),
            message="no request rate drawn")
        await b.screenshot(shots / "traffic.png")

        # -- configuration: secrets redacted, harmony check of the edited copy, reload
        await page(b, admin, "config", "#config-editor")
        shown = await b.script("return document.querySelector('pre.config').textContent")
        assert TOKEN not in shown and 'token = "<redacted>"' in shown
        await click(b, "#config-check")
        await b.wait(by_css("#config-result", text="harmony check: OK"))
        await click(b, "#config-reload")
        await b.run((await element(b, "#confirm-ok")).click)
        await b.wait(by_css("#reload-outcome", text="Reloaded."))
        await b.screenshot(shots / "config.png")

        # -- audit: the operator's actions, by name
        await page(b, admin, "audit", "tr.audit-entry[data-action='config.reload']")
        await b.wait(by_css("tr.audit-entry[data-action='queue.retry']"))
        assert "night-shift" in await text(b, "tr.audit-entry[data-action='queue.retry']")
        await b.screenshot(shots / "audit.png")

        # -- CSRF: the page's own origin, with the cookie but without the token, is refused
        status = await b.async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {method: 'POST', credentials: 'same-origin'}).then(r => done(r.status));",
            f"{admin}/queues/orthanc/wake")
        assert status == 403
        # -- CSP: markup that got in anyway cannot run inline script
        blocked = await b.async_script(
            "const done = arguments[arguments.length - 1];"
            "document.body.insertAdjacentHTML('beforeend', '<img id=probe src=x onerror=\"window.pwned=1\">');"
            "document.getElementById('probe').addEventListener('error', () => done(window.pwned === undefined));")
        assert blocked is True
        # No alert ever opened (an executed payload would have).
        from selenium.common.exceptions import NoAlertPresentException
        try:
            await b.run(lambda: b.driver.switch_to.alert.text)
            raise AssertionError("an alert opened")
        except NoAlertPresentException:
            pass

        # -- logout: back to the login form; the session no longer works
        await click(b, "#logout")
        await b.wait(by_css("#login-error", text="Logged out."))
        status = await b.async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {credentials: 'same-origin'}).then(r => done(r.status));", f"{admin}/info")
        assert status == 401
    finally:
        await b.stop()
        await rig.stop()
        print(f"console screenshots: {shots}")
        wanted = os.environ.get("HARMONY_CONSOLE_SCREENSHOTS")
        if wanted:
            Path(wanted).mkdir(parents=True, exist_ok=True)
            for shot in shots.glob("*.png"):
                shutil.copy(shot, Path(wanted) / shot.name)
