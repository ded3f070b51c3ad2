"""The console's server side over real HTTP (treq against a running Harmony):
token -> session cookie with its flags, CSRF on state-changing calls, CSP and
the other security headers, logout and expiry, the shipped assets, the JSON
calls the pages use (traffic, config redaction and check, archive, dead-letter
filters, send to target, audit), and the bearer token still working.
The same flows in a real browser are in test_console_browser.py."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer

from harmony.management import console
from tests.console_support import TOKEN, XSS, ConsoleRig, call

BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def rig(tmp_path):
    rig = pytest_twisted.blockon(defer.ensureDeferred(ConsoleRig(tmp_path).start()))
    yield rig
    pytest_twisted.blockon(defer.ensureDeferred(rig.stop()))


async def login(rig, operator="alice", secure_headers=None):
    r, doc = await call("POST", rig.admin("/session"), data=json.dumps({"token": TOKEN, "operator": operator}).encode(),
                        headers={"Content-Type": "application/json", **(secure_headers or {})})
    assert r.code == 200, doc
    (cookie,) = r.headers.getRawHeaders("set-cookie")
    sid = cookie.split(";")[0]
    return cookie, {"Cookie": sid}, doc["csrf"]


@pytest_twisted.ensureDeferred
async def test_login_cookie_csrf_csp_logout(rig):
    # The console's page and assets are public (no data in them); the API is not.
    r, body = await call("GET", rig.admin("/ui/"))
    assert r.code == 200 and b'<script type="module" src="app.js">' in body
    csp = r.headers.getRawHeaders("content-security-policy")[0]
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'",
                      "object-src 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers.getRawHeaders("x-frame-options") == ["DENY"]
    assert r.headers.getRawHeaders("x-content-type-options") == ["nosniff"]
    r, body = await call("GET", rig.admin("/ui/app.js"))
    assert r.code == 200 and r.headers.getRawHeaders("content-type")[0].startswith("text/javascript")
    for bad in ("/ui/../api.py", "/ui/%2e%2e/api.py", "/ui/nope.js", "/ui/views"):
        r, _ = await call("GET", rig.admin(bad))
        assert r.code == 404, bad
    r, _ = await call("GET", rig.admin("/ui"))
    assert r.code == 308 and r.headers.getRawHeaders("location") == ["/admin/ui/"]
    r, doc = await call("GET", rig.admin("/session"))
    assert r.code == 401

    # A wrong token: 401, no cookie, and the attempt is audited.
    r, doc = await call("POST", rig.admin("/session"), data=b'{"token": "wrong-wrong-wrong-wrong"}')
    assert r.code == 401 and not r.headers.getRawHeaders("set-cookie")

    cookie, jar, csrf = await login(rig)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback; see the TLS case below
    r, doc = await call("GET", rig.admin("/session"), headers=jar)
    assert r.code == 200 and doc["csrf"] == csrf and doc["who"].startswith("alice (console session")
    r, doc = await call("GET", rig.admin("/info"), headers=jar)
    assert r.code == 200 and doc["proxy_id"] == "ingest-test"

    # CSRF: a state-changing call with the cookie alone is refused, a wrong token too.
    for headers in (jar, {**jar, "X-CSRF-Token": "not-the-token"}):
        r, doc = await call("POST", rig.admin("/queues/orthanc/wake"), headers=headers)
        assert r.code == 403 and "CSRF" in doc["detail"]
    r, doc = await call("POST", rig.admin("/queues/orthanc/wake"), headers={**jar, "X-CSRF-Token": csrf})
    assert r.code == 200 and doc["target"] == "orthanc"
    # The bearer token needs no CSRF token (no ambient credential to forge with).
    r, doc = await call("POST", rig.admin("/queues/orthanc/wake"), headers=BEARER)
    assert r.code == 200

    # Logout: the session is gone server-side, the cookie is cleared.
    r, _ = await call("DELETE", rig.admin("/session"), headers={**jar, "X-CSRF-Token": csrf})
    assert r.code == 200 and "Max-Age=0" in r.headers.getRawHeaders("set-cookie")[0]
    r, _ = await call("GET", rig.admin("/info"), headers=jar)
    assert r.code == 401

    # Every action above is in the audit log, with who and the outcome, and on disk.
    r, doc = await call("GET", rig.admin("/audit"), headers=BEARER)
    actions = [(e["action"], e["status"]) for e in reversed(doc["entries"])]
    assert actions == [("session.login", 401), ("session.login", 200), ("queue.wake", 200), ("queue.wake", 200),
                       ("session.logout", 200)]
    assert doc["entries"][-2]["who"].startswith("alice")  # the first wake, by the console session
    stored = (rig.config_path.parent / "store" / "management-audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["action"] for line in stored] == [a for a, _ in actions]


def test_sessions_expire_when_idle_and_cookie_is_secure_over_tls():
    now = [1000.0]
    store = console.SessionStore(clock=lambda: now[0])

    class Req:
        def __init__(self, cookie=None, secure=False):
            from twisted.web.http_headers import Headers
            self.cookie, self.secure, self.responseHeaders = cookie, secure, Headers()

        def getCookie(self, name):
            return self.cookie

        def isSecure(self):
            return self.secure

    s = store.create(Req(), "127.0.0.1", "bob")
    assert store.from_request(Req(s.sid.encode())) is s
    now[0] += console.IDLE_SECONDS - 1
    assert store.from_request(Req(s.sid.encode())) is s  # use keeps it alive...
    now[0] += console.IDLE_SECONDS + 1
    assert store.from_request(Req(s.sid.encode())) is None and len(store) == 0  # ...idleness ends it
    s = store.create(Req(), "127.0.0.1", "bob")
    for _ in range(int(console.MAX_AGE_SECONDS / (console.IDLE_SECONDS / 2)) + 1):
        now[0] += console.IDLE_SECONDS / 2
        store.from_request(Req(s.sid.encode()))
    assert store.from_request(Req(s.sid.encode())) is None  # and so does age, however busy
    tls = Req(secure=True)
    console.set_cookie(tls, store.create(tls, "::1"), "/admin")
    assert "; Secure" in tls.responseHeaders.getRawHeaders(b"set-cookie")[0].decode()
    for _ in range(console.MAX_SESSIONS + 10):
        store.create(Req(), "127.0.0.1")
    assert len(store) == console.MAX_SESSIONS
    # Failed logins are counted per address over a sliding minute.
    throttle = console.LoginThrottle(limit=3, window=60.0, clock=lambda: now[0])
    for _ in range(3):
        assert not throttle.blocked("10.9.9.9")
        throttle.failed("10.9.9.9")
    assert throttle.blocked("10.9.9.9") and not throttle.blocked("127.0.0.1")
    now[0] += 61
    assert not throttle.blocked("10.9.9.9")


@pytest_twisted.ensureDeferred
async def test_console_data_calls(rig):
    # Config: secrets redacted; the check runs the real `harmony check` on an edited copy.
    r, doc = await call("GET", rig.admin("/config"), headers=BEARER)
    main = doc["files"][0]["text"]
    assert TOKEN not in json.dumps(doc) and 'token = "<redacted>"' in main
    r, doc = await call("POST", rig.admin("/config/check"), headers=BEARER, data=main.encode())
    assert r.code == 200 and doc["ok"] is True and "OK (proxy id 'ingest-test'" in doc["output"], doc
    broken = main.replace('service = "store_forward"', 'service = "store_forwardd"')
    r, doc = await call("POST", rig.admin("/config/check"), headers=BEARER, data=broken.encode())
    assert doc["ok"] is False and "store_forwardd" in doc["output"]
    assert not list(rig.config_path.parent.glob(".harmony-console-check-*"))  # the copy is gone

    # Dead letters, filtered; bulk retry by filter.
    r, doc = await call("GET", rig.admin("/queues/orthanc/dead"), headers=BEARER)
    assert [e["sop_instance_uid"] for e in doc["entries"]] == [rig.poison]
    study = doc["entries"][0]["study_instance_uid"]
    for query, n in ((f"study={study}", 1), ("study=1.2.3", 0), ("error=409", 1), ("error=timeout", 0),
                     ("since=1", 1), ("until=1", 0), (f"sop_class={doc['entries'][0]['sop_class_uid']}", 1)):
        r, doc = await call("GET", rig.admin(f"/queues/orthanc/dead?{query}"), headers=BEARER)
        assert (r.code, doc["matching"], len(doc["entries"])) == (200, n, n), query
    r, doc = await call("GET", rig.admin("/queues/orthanc/dead?since=yesterday"), headers=BEARER)
    assert r.code == 400 and doc["type"].endswith("bad-request")
    r, doc = await call("POST", rig.admin("/queues/orthanc/retry?study=1.2.3"), headers=BEARER)
    assert doc["retried"] == 0
    rig.accept_poison = True
    r, doc = await call("POST", rig.admin(f"/queues/orthanc/retry?study={study}"), headers=BEARER)
    assert doc["retried"] == 1
    await rig.forward.idle()
    assert rig.target.stored.get(rig.poison) == 1

    # Archive: patients -> studies -> series -> instances, a thumbnail, send to target.
    r, doc = await call("GET", rig.admin("/archive/stores"), headers=BEARER)
    assert doc == {"stores": [{"name": "sf", "type": "store_forward"}], "targets": ["orthanc"]}
    r, doc = await call("GET", rig.admin("/archive/sf/patients"), headers=BEARER)
    names = {p["name"]: p for p in doc["patients"]}
    assert set(names) == {"DOE^JANE", XSS}  # JSON carries the text; the page renders it as text
    r, doc = await call("GET", rig.admin("/archive/sf/patients?q=doe"), headers=BEARER)
    assert [p["patient_id"] for p in doc["patients"]] == ["CONSOLE1"]
    r, doc = await call("GET", rig.admin(f"/archive/sf/patients/{names['DOE^JANE']['pk']}/studies"), headers=BEARER)
    (st,) = doc["studies"]
    assert (st["study_instance_uid"], st["series"], st["instances"]) == (study, 1, 3)
    r, doc = await call("GET", rig.admin(f"/archive/sf/studies/{study}/series"), headers=BEARER)
    (se,) = doc["series"]
    r, doc = await call("GET", rig.admin(f"/archive/sf/series/{se['series_instance_uid']}/instances"), headers=BEARER)
    assert len(doc["instances"]) == 3
    r, body = await call("GET", rig.admin(f"/archive/sf/instances/{rig.poison}/thumbnail"), headers=BEARER)
    assert r.code == 200 and body[:2] == b"\xff\xd8" and r.headers.getRawHeaders("content-type") == ["image/jpeg"]
    r, doc = await call("GET", rig.admin("/archive/sf/instances/1.2.3/thumbnail"), headers=BEARER)
    assert r.code == 404
    r, doc = await call("GET", rig.admin("/archive/nope/patients"), headers=BEARER)
    assert r.code == 404 and doc["status"] == 404
    before = dict(rig.target.stored)
    r, doc = await call("POST", rig.admin(f"/archive/sf/studies/{study}/send?target=orthanc"), headers=BEARER)
    assert (r.code, doc["queued"]) == (200, 3), doc
    await rig.forward.idle()
    assert all(rig.target.stored[s] == before[s] + 1 for s in before if s.startswith(study))
    r, doc = await call("POST", rig.admin(f"/archive/sf/studies/{study}/send?target=nobody"), headers=BEARER)
    assert r.code == 404

    # The topology the overview draws: backends, their targets, what store_forward queues for.
    r, doc = await call("GET", rig.admin("/backends"), headers=BEARER)
    by_name = {b["name"]: b for b in doc["backends"]}
    assert by_name["sf"] == {"name": "sf", "type": "store_forward", "targets": [], "forwards_to": ["orthanc"]}
    assert by_name["up"]["targets"] == ["pacs-a", "pacs-b"] and by_name["orthanc"]["targets"] == ["orthanc"]

    # Traffic: per pipeline totals and points from the Prometheus histogram.
    from harmony.management.console import console_state
    assert console_state(rig.harmony.service).traffic.history  # sampled since start, before anyone asked
    r, doc = await call("GET", rig.admin("/traffic"), headers=BEARER)
    ingest = doc["pipelines"]["ingest"]["total"]
    assert ingest["requests"] == 4 and ingest["errors"] == 0 and 0 < ingest["p50"] <= ingest["p99"]

    # Routing errors are problem+json from Klein's map; methods are enforced.
    r, doc = await call("GET", rig.admin("/no/such/thing"), headers=BEARER)
    assert r.code == 404 and doc["type"].endswith("not-found")
    r, doc = await call("DELETE", rig.admin("/info"), headers=BEARER)
    assert r.code == 405 and "GET" in r.headers.getRawHeaders("allow")[0]
    r, doc = await call("POST", rig.admin("/config/check"), headers=BEARER, data=b"x" * (1024 * 1024 + 1))
    assert r.code == 413


@pytest.mark.parametrize("text,hidden", [
    ('[a]\ntoken = "abc123"\npassword = "p4ss"\nhs256_secret = "s3"\ntoken_file = "keep/me"\n',
     ["abc123", "p4ss", "s3"]),
    ('[b]\nurl = "http://user:hunter2@pacs:8042/"\nlist = ["http://u:pw9@h/"]\n', ["hunter2", "pw9"]),
])
def test_config_redaction(text, hidden):
    from harmony.management.configview import redact_text
    out = redact_text(text)
    assert all(h not in out for h in hidden), out
    assert "keep/me" in out or "token_file" not in text


@pytest_twisted.ensureDeferred
async def test_hostile_input_to_the_console(rig):
    # Malformed, deeply nested, wrongly typed and oversized login bodies: clear refusals, never a 500.
    for body in (b"not json", b"[" * 100_000, b'{"token": 5}', b'"just a string"', b"\xff\xfe"):
        r, doc = await call("POST", rig.admin("/session"), data=body, headers={"Content-Type": "application/json"})
        assert r.code == 401 and doc["status"] == 401, body[:20]
    r, doc = await call("POST", rig.admin("/session"), data=b"x" * (1024 * 1024 + 1))
    assert r.code == 413
    # Guessing the token: after 10 failures a minute from one address (the 5 above count), 429 - even
    # for the right token - and the audit log stays bounded.
    codes = []
    for _ in range(20):
        r, _ = await call("POST", rig.admin("/session"), data=b'{"token": "guess-guess-guess-guess"}')
        codes.append(r.code)
    assert codes == [401] * 5 + [429] * 15
    r, doc = await call("POST", rig.admin("/session"), data=json.dumps({"token": TOKEN}).encode())
    assert r.code == 429 and "too many failed logins" in doc["detail"]
    r, doc = await call("GET", rig.admin("/audit"), headers=BEARER)
    assert len([e for e in doc["entries"] if e["action"] == "session.login"]) == 10
    # Forged, empty and garbage cookies are simply no session.
    for cookie in ("harmony_console=forged", "harmony_console=", "harmony_console=\x7f\x7f", "x" * 4000):
        r, _ = await call("GET", rig.admin("/info"), headers={"Cookie": cookie})
        assert r.code == 401
    # Paths that are not UTF-8 or try to climb out of the assets: 400/404 as problem+json.
    r, doc = await call("GET", rig.admin("/%ff%fe"), headers=BEARER)
    assert r.code == 400 and doc["detail"] == "the path is not UTF-8"
    for path in ("/ui/%2e%2e%2fapi.py", "/ui/..%2f..%2fsetup.cfg", "/archive/sf/instances/%2e%2e/thumbnail"):
        r, doc = await call("GET", rig.admin(path), headers=BEARER)
        assert r.code == 404, path
    # Percent-encoded names reach the routes decoded (a target name is a TOML key).
    r, doc = await call("GET", rig.admin("/queues/%6Frthanc/dead"), headers=BEARER)
    assert r.code == 200 and doc["target"] == "orthanc"


def test_traffic_percentiles_from_cumulative_buckets():
    from harmony.management.metrics import LATENCY_BUCKETS
    from harmony.management.traffic import percentile
    n = len(LATENCY_BUCKETS) + 1
    assert percentile([0.0] * n, 0.5) is None
    # 100 observations: 50 in (0, 1 ms], 50 in (1 ms, 2.5 ms].
    cumulative = [50.0] + [100.0] * (n - 1)
    assert percentile(cumulative, 0.5) == pytest.approx(0.001)
    assert percentile(cumulative, 0.75) == pytest.approx(0.001 + 0.0015 / 2)
    # Everything beyond the last bucket: the last bound, not infinity.
    assert percentile([0.0] * (n - 1) + [10.0], 0.99) == LATENCY_BUCKETS[-1]


@pytest_twisted.ensureDeferred
async def test_console_mounted_on_a_network(tmp_path):
    from tests.harness import MINIMAL_MAIN, start_harmony, write_config
    main = MINIMAL_MAIN + f'[management]\nenabled = true\nnetwork = "default"\nbase_path = "ops/admin"\ntoken = "{TOKEN}"\n'
    running = await start_harmony(write_config(tmp_path, main))
    try:
        r, body = await call("GET", running.url("/ops/admin/ui/"))
        assert r.code == 200 and b"app.js" in body and r.headers.getRawHeaders("content-security-policy")
        r, doc = await call("POST", running.url("/ops/admin/session"), data=json.dumps({"token": TOKEN}).encode())
        cookie = r.headers.getRawHeaders("set-cookie")[0]
        assert r.code == 200 and "Path=/ops/admin;" in cookie
        r, doc = await call("GET", running.url("/ops/admin/info"), headers={"Cookie": cookie.split(";")[0]})
        assert r.code == 200 and doc["proxy_id"] == "test"
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_console_calls_leave_no_phi_in_the_info_log(rig, tmp_path):
    """Searching the archive by name, listing patients and studies, thumbnails and
    sending a study: no event at info level names the patient (log_level is info)."""
    import treq
    from twisted.logger import formatEvent, globalLogPublisher

    from tests.dicom_data import UID_ROOT, make_instance, save
    ds = make_instance(patient_id="PHIPID0815", patient_name="PHIPROBE^CONSOLE", study_uid=f"{UID_ROOT}63.1",
                       series_uid=f"{UID_ROOT}63.1.1", sop_uid=f"{UID_ROOT}63.1.1.1", rows=16, cols=16)
    ds.PatientBirthDate = "19121231"
    f = save(ds, tmp_path / "phi.dcm")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        r = await treq.post(rig.harmony.url("/ingest"), data=f.read_bytes(), headers={"Content-Type": "application/dicom"})
        assert r.code == 200
        cookie, jar, csrf = await login(rig, operator="phi-check")
        r, doc = await call("GET", rig.admin("/archive/sf/patients?q=PHIPROBE"), headers=jar)
        (patient,) = doc["patients"]
        assert patient["patient_id"] == "PHIPID0815"  # the search did find the patient
        await call("GET", rig.admin(f"/archive/sf/patients/{patient['pk']}/studies"), headers=jar)
        await call("GET", rig.admin(f"/archive/sf/instances/{UID_ROOT}63.1.1.1/thumbnail"), headers=jar)
        r, doc = await call("POST", rig.admin(f"/archive/sf/studies/{UID_ROOT}63.1/send?target=orthanc"),
                            headers={**jar, "X-CSRF-Token": csrf})
        assert doc["queued"] == 1
        await rig.forward.idle()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any(e.get("log_namespace") == "harmony.management.console" for e in events)  # actions were logged
    text = "\n".join(f"{formatEvent(e)} {e!r}" for e in events if e.get("log_level") is None
                     or e["log_level"].name != "debug")
    leaked = [s for s in ("PHIPROBE", "CONSOLE", "PHIPID0815", "19121231") if s in text]
    assert not leaked, [line for line in text.splitlines() if any(s in line for s in leaked)][:5]
