"""``harmony deidentify``: the de-identifier on files and folders, with a dry-run report.

Why: a project checks its settings on a sample before it puts them on the wire,
and sometimes only has a folder to clean.  The options are the middleware's
options table (``--options FILE.toml``) or the same keys as flags, and the
engine is the one the proxy runs, so the results are identical.

    harmony deidentify --keygen deid.key
    harmony deidentify --key deid.key --retain-longitudinal modified IN/ -o OUT/
    harmony deidentify --options deid.toml --dry-run IN/          # what each action would do

Output files are named by their new UIDs (``OUT/<study>/<series>/<sop>.dcm``): input
file names often carry a patient's name.  The report names attributes and actions,
never values.  Exit status: 0 done, 1 some input could not be read or options are
invalid, 2 usage.
"""

from __future__ import annotations

import collections
import json
import sys
import tomllib
from pathlib import Path

from harmony.config.errors import OptionError
from harmony.config.options import Options
from harmony.deid.config import KEYS, build
from harmony.deid.files import QUARANTINED, deidentify_file
from harmony.deid.keys import generate_secret_file

_FLAGS = ("retain_uids", "retain_device_identity", "retain_institution_identity", "retain_patient_characteristics",
          "clean_descriptors", "clean_structured_content", "clean_graphics")


def add_deidentify(sub):
    p = sub.add_parser("deidentify", help="de-identify DICOM files and folders (PS3.15 Annex E)",
                       description="De-identify DICOM Part-10 files with the deidentify middleware's engine.")
    p.add_argument("inputs", nargs="*", type=Path, help="files or folders (searched recursively)")
    p.add_argument("-o", "--output", type=Path, help="output folder (not needed with --dry-run)")
    p.add_argument("--keygen", type=Path, metavar="FILE", help="write a new secret to FILE and exit")
    p.add_argument("--key", type=Path, metavar="FILE", help="the secret file (secret_file)")
    p.add_argument("--options", type=Path, metavar="TOML",
                   help="a TOML file with the middleware's option keys (flags override it)")
    p.add_argument("--retain-longitudinal", choices=("no", "full", "modified"))
    for flag in _FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), action="store_true", default=None)
    p.add_argument("--safe-private", action="append", metavar="GGGG,CREATOR,EE",
                   help="retain this private attribute (repeatable; implies Retain Safe Private)")
    p.add_argument("--lookup-table", type=Path, metavar="CSV", help="PatientID,Pseudonym[,PseudonymName]")
    p.add_argument("--pixels", choices=("quarantine", "forward"),
                   help="instances that may carry burned-in identity: skip them (default) or write them")
    p.add_argument("--dry-run", action="store_true", help="write nothing; report what each action would do")
    p.add_argument("--report", type=Path, metavar="JSON", help="write the full per-file report as JSON")
    p.set_defaults(func=cmd_deidentify)


def _options(args) -> Options:
    raw: dict = {}
    base = Path.cwd()
    if args.options:
        try:
            raw = tomllib.loads(args.options.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise OptionError("--options", f"{args.options}: {e}") from None
        base = args.options.resolve().parent
        unknown = sorted(set(raw) - set(KEYS))
        if unknown:
            raise OptionError("--options", f"{args.options}: unknown key(s): {', '.join(unknown)}")
    if args.key:
        raw["secret_file"] = str(args.key.resolve())
    if args.retain_longitudinal:
        raw["retain_longitudinal"] = args.retain_longitudinal
    for flag in _FLAGS:
        if getattr(args, flag):
            raw[flag] = True
    if args.safe_private:
        raw["safe_private"] = list(args.safe_private)
    if args.lookup_table:
        raw["lookup_table"] = str(args.lookup_table.resolve())
    if args.pixels:
        raw.setdefault("pixels", {})["suspect"] = args.pixels
    return Options(raw, base)


def _named(folder: Path | None, ds) -> Path:
    """``folder/<study>/<series>/<sop>.dcm`` by the new UIDs (input names may carry a name)."""
    return (folder or Path(".")) / str(ds.get("StudyInstanceUID", "nostudy")) / \
        str(ds.get("SeriesInstanceUID", "noseries")) / f"{ds.get('SOPInstanceUID', 'nosop')}.dcm"


def _files(inputs):
    for item in inputs:
        if item.is_dir():
            yield from sorted(p for p in item.rglob("*") if p.is_file())
        else:
            yield item


def cmd_deidentify(args) -> int:
    if args.keygen:
        try:
            generate_secret_file(args.keygen)
        except FileExistsError:
            print(f"harmony deidentify: {args.keygen} exists; not overwriting a secret", file=sys.stderr)
            return 1
        print(f"wrote a new secret to {args.keygen} (keep it: the same secret gives the same pseudonyms)")
        return 0
    if not args.inputs:
        print("harmony deidentify: name files or folders to de-identify", file=sys.stderr)
        return 2
    if not args.dry_run and not args.output:
        print("harmony deidentify: -o OUTPUT is needed (or --dry-run)", file=sys.stderr)
        return 2
    try:
        deid, policy = build(_options(args))
    except OptionError as e:
        print(f"harmony deidentify: {e.key}: {e.message}", file=sys.stderr)
        return 1
    totals: collections.Counter[str] = collections.Counter()
    actions: collections.Counter[str] = collections.Counter()
    files = []
    for path in _files(args.inputs):
        entry: dict[str, object] = {"input": str(path)}
        try:
            outcome = deidentify_file(deid, policy, path, lambda ds: _named(args.output, ds), report=True,
                                      dry_run=args.dry_run)
        except Exception as e:  # noqa: BLE001 - one unreadable file must not stop a folder
            entry.update(verdict="error", error=f"{type(e).__name__}: {e}"[:200])
            totals["error"] += 1
            files.append(entry)
            continue
        totals[outcome.verdict] += 1
        per_action = collections.Counter(c.action for c in outcome.changes)
        actions.update(per_action)
        entry.update(verdict=outcome.verdict, reason=outcome.reason, sop_instance_uid=outcome.sop_instance_uid,
                     output=str(outcome.path) if outcome.path else None, masked_by=outcome.masked_by,
                     actions=dict(per_action),
                     changes=[{"path": c.path, "tag": f"({c.tag >> 16:04X},{c.tag & 0xFFFF:04X})", "name": c.name,
                               "action": c.action} for c in outcome.changes])
        files.append(entry)
        status = outcome.verdict if not args.dry_run or outcome.verdict == QUARANTINED else "would be de-identified"
        why = f" ({outcome.reason})" if outcome.reason else ""
        print(f"{path}: {status}{why}; " + ", ".join(f"{a} {n}" for a, n in sorted(per_action.items())))
    summary = {"files": dict(totals), "actions": dict(actions), "dry_run": args.dry_run,
               "profile_codes": [c for c, _ in deid.profile.codes]}
    print(json.dumps(summary))
    if args.report:
        args.report.write_text(json.dumps({"summary": summary, "files": files}, indent=1))
    return 1 if totals["error"] else 0
