"""``harmony jmix build|verify|extract|keygen``: the library from the shell.

Exit status: 0 success, 1 an invalid envelope or failed build, 2 usage errors
(argparse).  ``verify`` prints every finding of every validation layer.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from harmony.jmix import crypto
from harmony.jmix.archive import TAR_GZ, ZIP, ArchiveError, pack
from harmony.jmix.builder import AssertionSpec, BuildError, BuildOptions, Entity, build_envelope
from harmony.jmix.dicom import DicomInputError
from harmony.jmix.profiles import PROFILES
from harmony.jmix.validate import VerifyOptions, discard, open_envelope


def _format_for(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return TAR_GZ
    if name.endswith(".zip"):
        return ZIP
    raise SystemExit(f"harmony jmix: output {path} must end in .zip or .tar.gz")


def cmd_build(args) -> int:
    out = Path(args.output)
    fmt = _format_for(out)
    receivers = [Entity(r) for r in args.receiver_id] if args.receiver_id else BuildOptions().receivers
    options = BuildOptions(
        sender=Entity(args.sender_id, args.sender_name, args.sender_contact),
        requester=Entity(args.requester_id) if args.requester_id else None,
        receivers=receivers, profile=args.profile,
        skip_hashing=args.skip_hashing, skip_listing=args.skip_listing)
    try:
        if args.encrypt_to:
            options.recipient_public_key = crypto.x25519_public(Path(args.encrypt_to))
        if args.sign_key:
            options.jws_key = crypto.ed25519_private(Path(args.sign_key))
        if args.assert_key:
            options.assertions["sender"] = AssertionSpec(crypto.ed25519_private(Path(args.assert_key)))
        with tempfile.TemporaryDirectory(prefix="jmix-build-", dir=out.parent) as work:
            result = build_envelope(args.sources, Path(work), options)
            pack(result.root, out, fmt)
    except (BuildError, DicomInputError, crypto.CryptoError, ArchiveError, OSError) as e:
        print(f"harmony jmix build: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"id": result.envelope_id, "study_uid": result.study_uid, "instances": result.instance_count,
                      "output": str(out)}))
    return 0


def _verify_options(args) -> VerifyOptions:
    return VerifyOptions(
        private_key=crypto.x25519_private(Path(args.key)) if args.key else None,
        jws_keys=[crypto.ed25519_public(Path(k)) for k in args.jws_key or []],
        verify_assertions=not args.no_assertions)


def _print_report(report, as_json: bool, out=None):
    # Looked up per call: a default of sys.stdout would pin whatever stdout was
    # when the module was first imported (a closed capture, a redirect gone by).
    out = sys.stdout if out is None else out
    if as_json:
        out.write(json.dumps(report.to_json(), indent=2) + "\n")
        return
    out.write(f"{'VALID' if report.ok else 'INVALID'}: envelope {report.envelope_id or '?'}"
              f" study {report.study_uid or '?'}\n")
    for stage, message in report.errors:
        out.write(f"  error [{stage}] {message}\n")
    for stage, message in report.warnings:
        out.write(f"  warning [{stage}] {message}\n")
    for key, value in report.info.items():
        if key != "workdir":
            out.write(f"  {key}: {value}\n")


@contextlib.contextmanager
def _opened(args, command: str):
    """Load keys, unpack and validate ``args.file``; yields the report (or an exit
    status for unusable keys) and removes every temporary folder afterwards."""
    try:
        options = _verify_options(args)
    except (crypto.CryptoError, OSError) as e:
        print(f"harmony jmix {command}: {e}", file=sys.stderr)
        yield 2
        return
    with tempfile.TemporaryDirectory(prefix=f"jmix-{command}-") as work:
        report = open_envelope(Path(args.file), Path(work), options)
        try:
            yield report
        finally:
            discard(report)


def cmd_verify(args) -> int:
    with _opened(args, "verify") as report:
        if isinstance(report, int):
            return report
        _print_report(report, args.json)
        return 0 if report.ok else 1


def cmd_extract(args) -> int:
    """Validate, then write the envelope (payload decrypted when a key is given) to a new folder."""
    dest = Path(args.output)
    if dest.exists():
        print(f"harmony jmix extract: {dest} already exists", file=sys.stderr)
        return 1
    with _opened(args, "extract") as report:
        if isinstance(report, int):
            return report
        if not report.ok:
            _print_report(report, False, sys.stderr)
            return 1
        shutil.copytree(report.root, dest, symlinks=False)
        if report.payload is not None and report.payload.parent != report.root:
            shutil.copytree(report.payload, dest / "payload")
    print(json.dumps({"id": report.envelope_id, "study_uid": report.study_uid, "output": str(dest)}))
    return 0


def cmd_keygen(args) -> int:
    """Write a key pair as base64 text files ``PREFIX.key`` (private) and ``PREFIX.pub``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    key = (X25519PrivateKey if args.type == "x25519" else Ed25519PrivateKey).generate()
    prefix = Path(args.prefix)
    private = prefix.with_name(prefix.name + ".key")
    with open(private, "x") as f:
        f.write(crypto.b64(crypto.raw_private(key)) + "\n")
    private.chmod(0o600)
    prefix.with_name(prefix.name + ".pub").write_text(crypto.b64(crypto.raw_public(key)) + "\n")
    print(json.dumps({"type": args.type, "private": str(private), "public": str(prefix) + ".pub",
                      "fingerprint": crypto.fingerprint(key)}))
    return 0


def add_jmix(sub):
    p = sub.add_parser("jmix", help="build, verify and extract JMIX envelopes")
    jsub = p.add_subparsers(dest="jmix_command", required=True)

    b = jsub.add_parser("build", help="package one study's DICOM files as a JMIX envelope")
    b.add_argument("sources", nargs="+", help="DICOM files or folders (walked recursively)")
    b.add_argument("-o", "--output", required=True, help="OUT.zip or OUT.tar.gz")
    b.add_argument("--sender-id", default="org:harmony-proxy")
    b.add_argument("--sender-name", default="Harmony Proxy")
    b.add_argument("--sender-contact", default=None)
    b.add_argument("--receiver-id", action="append", help="repeatable; default urn:jmix:receiver:unspecified")
    b.add_argument("--requester-id")
    b.add_argument("--profile", choices=sorted(PROFILES), default="spec")
    b.add_argument("--encrypt-to", metavar="X25519_PUBLIC_KEY_FILE")
    b.add_argument("--sign-key", metavar="ED25519_PRIVATE_KEY_FILE", help="write manifest.jws")
    b.add_argument("--assert-key", metavar="ED25519_PRIVATE_KEY_FILE", help="add a sender assertion")
    b.add_argument("--skip-hashing", action="store_true")
    b.add_argument("--skip-listing", action="store_true")
    b.set_defaults(func=cmd_build)

    for name, func, text in (("verify", cmd_verify, "validate an envelope layer by layer"),
                             ("extract", cmd_extract, "validate and unpack an envelope (decrypting it)")):
        v = jsub.add_parser(name, help=text)
        v.add_argument("file", help="a .zip, .tar.gz or unpacked envelope folder")
        if name == "extract":
            v.add_argument("-o", "--output", required=True, help="a new folder")
        v.add_argument("--key", metavar="X25519_PRIVATE_KEY_FILE", help="decrypt an encrypted payload")
        v.add_argument("--jws-key", action="append", metavar="ED25519_PUBLIC_KEY_FILE",
                       help="trusted key for manifest.jws (repeatable)")
        v.add_argument("--no-assertions", action="store_true", help="do not verify entity assertions")
        if name == "verify":
            v.add_argument("--json", action="store_true", help="print the report as JSON")
        v.set_defaults(func=func)

    k = jsub.add_parser("keygen", help="make an X25519 (encryption) or Ed25519 (signing) key pair")
    k.add_argument("--type", choices=("x25519", "ed25519"), required=True)
    k.add_argument("prefix", help="writes PREFIX.key and PREFIX.pub")
    k.set_defaults(func=cmd_keygen)
