"""Bench-only (bench/dimse/spans.py): timestamps inside a Harmony process for proxied C-FINDs.

Loaded into twistd through PYTHONPATH when CFSPAN_OUT names a file; wraps the association's
``dataReceived`` and ``send_now`` and the C-FIND's functions on the way to the PACS.  Spans:
A = the client's last read -> the request sent to the PACS (split into its steps; a C-FIND sent
before the pipeline runs has its own), B = the PACS's first bytes read -> the client's final
response sent, C = that send -> the end of the delivery (the work after the final response),
D = that end -> the client's next request read (near zero when the request was already waiting:
C was then on its path), E = the final response sent -> the next request read (the client's
turnaround as Harmony sees it), F = the PACS's first bytes read -> the read holding its final
response (the PACS's own pace, mostly), G = that read -> the client's final sent (Harmony's part of
B).  Written at SIGUSR2 (the tenth first left out)."""
import atexit
import os
import statistics
import time

if os.environ.get("CFSPAN_OUT"):
    from harmony.dicom.ul import association as A
    clock = time.perf_counter_ns
    st = {"req": None, "pacs_in": None, "final_out": None}
    spans = {"A": [], "B": [], "C": [], "D": [], "E": [], "F": [], "G": []}
    orig_dr = A.Association.dataReceived
    orig_send = A.send_now

    FINAL = b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00"

    def dataReceived(self, data):
        t = clock()
        scu = type(self.handler).__name__ == "_Receiver"
        if not scu:
            st["req"] = t
            if st.get("c_end") is not None:
                spans["D"].append(t - st["c_end"])
                spans["E"].append(t - st["final_prev"])
                st["c_end"] = None
        elif st["pacs_in"] is None and st["req"] is not None:
            st["pacs_in"] = t
        if scu and st["pacs_in"] is not None and FINAL in bytes(data):
            st["final_in"] = t
            spans["F"].append(t - st["pacs_in"])
        orig_dr(self, data)
        if scu and st["pacs_in"] is not None and FINAL in bytes(data) and st["final_out"] is not None:
            spans["G"].append(st["final_out"] - st["final_in"])
            spans["B"].append(st["final_out"] - st["pacs_in"])
            st["c_end"] = clock()
            st["final_prev"] = st["final_out"]
            spans["C"].append(st["c_end"] - st["final_out"])
            st["final_out"] = st["pacs_in"] = st["req"] = None

    def send_now(transport, data):
        orig_send(transport, data)
        t = clock()
        proto = getattr(transport, "protocol", None)
        while proto is not None and not isinstance(proto, A.Association):
            proto = getattr(proto, "wrappedProtocol", None) or getattr(proto, "_wrappedProtocol", None)
        if proto is None:
            return
        scu = type(proto.handler).__name__ == "_Receiver"
        if scu and st["req"] is not None and st["pacs_in"] is None:
            spans["A"].append(t - st["req"])
            marks["read"] = st["req"]
            marks["sent"] = t
            seq = ["read", *(AHEAD if "find_ahead" in marks else ORDER), "sent"]
            if all(k in marks for k in seq):
                for a, b in zip(seq, seq[1:], strict=False):
                    spans[f"{a}->{b}"].append(marks[b] - marks[a])
            marks.clear()
        elif not scu and st["pacs_in"] is not None:
            st["final_out"] = t

    marks: dict = {}
    #: The request's steps, in the order they run (each wrapped below).
    ORDER = ["on_request", "start_pipeline", "backend_send", "attempt", "find", "request"]
    #: ... and those of a C-FIND sent before the pipeline runs (dicom_scu.FindAhead), when this build has it.
    AHEAD = ["on_request", "find_ahead", "request"]
    from harmony.backends import dicom_scu as SCU
    from harmony.endpoints import dicom_scp as SCP
    def wrap(cls, name, label):
        orig = getattr(cls, name)
        def w(*a, **k):
            marks[label] = clock()
            return orig(*a, **k)
        setattr(cls, name, w)
    wrap(SCP.ScpServices, "on_request", "on_request")
    wrap(SCP.DicomScpEndpoint, "start_pipeline", "start_pipeline")
    wrap(SCU.DicomScuBackend, "send", "backend_send")
    wrap(SCU.DicomScuBackend, "_attempt", "attempt")
    wrap(SCU.DicomScuBackend, "_find", "find")
    wrap(A.Association, "request", "request")
    if hasattr(SCU.DicomScuBackend, "find_ahead"):
        wrap(SCU.DicomScuBackend, "find_ahead", "find_ahead")
    for steps in (ORDER, AHEAD):
        for a, b in zip(["read", *steps], [*steps, "sent"], strict=True):
            spans[f"{a}->{b}"] = []
    A.Association.dataReceived = dataReceived
    A.send_now = send_now

    import gc
    gc_runs: dict = {}

    young_kinds: dict = {}
    started = [0]   # when the collection running now began

    def gc_timed(phase, info):
        if not gc.get_freeze_count():
            return   # start-up's collections (before harmony.service froze what it built) are not the C-FINDs'
        if phase == "start":
            if info["generation"] == 0 and os.environ.get("CFSPAN_GC_KINDS") and not young_kinds and \
                    gc_runs.get(0, [0])[0] == 5:
                import collections
                young_kinds.update(collections.Counter(
                    f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects(0)).most_common(25))
            started[0] = clock()
        else:
            runs = gc_runs.setdefault(info["generation"], [0, 0, 0])
            runs[0] += 1
            runs[1] += clock() - started[0]
            runs[2] += info.get("collected", 0)
    gc.callbacks.append(gc_timed)

    def dump():
        with open(os.environ["CFSPAN_OUT"], "a") as f:
            for kind, n in young_kinds.items():
                f.write(f"{os.getpid()} young at the 6th collection after the freeze: {n} {kind}\n")
            for generation, (n, ns, collected) in sorted(gc_runs.items()):
                f.write(f"{os.getpid()} gc generation {generation}: {n} collections, {ns / 1e6:.1f} ms in all, "
                        f"{collected} objects collected\n")
            for k, v in spans.items():
                v = v[len(v) // 10:]
                if v:
                    v = sorted(v)
                    f.write(f"{os.getpid()} {k} n={len(v)} p50={statistics.median(v) / 1000:.1f}us "
                            f"p25={v[len(v) // 4] / 1000:.1f} p75={v[3 * len(v) // 4] / 1000:.1f}\n")
    atexit.register(dump)
    import signal
    def term(*_args):
        dump()
        os._exit(0)
    signal.signal(signal.SIGUSR2, term)
