"""``harmony transform SPEC.json [INPUT.json]``: run a JOLT spec from the shell.

The tool for developing transforms: the same engine and the same checks the
proxy applies at start-up, so a spec that works here works in a pipeline.
Reads the input from stdin when no file is given; prints the output as JSON.
Exit status 0 on success, 2 for a bad spec, 3 for bad input, 4 when the spec
fails on that input - each with a message naming what is wrong.
"""

from __future__ import annotations

import json
import sys

from harmony.transform import SpecInvalid, TransformFailed, load_spec, parse_json_text

EXIT_SPEC, EXIT_INPUT, EXIT_TRANSFORM = 2, 3, 4


def _read_input(name: str | None, label: str):
    if name is None or name == "-":
        raw = sys.stdin.buffer.read()
        source = "<stdin>"
    else:
        source = name
        with open(name, "rb") as f:
            raw = f.read()
    return parse_json_text(raw, source if label == "input" else f"{label} {source}")


def cmd_transform(args) -> int:
    err = sys.stderr
    try:
        spec = load_spec(args.spec)
    except SpecInvalid as e:
        print(f"harmony transform: bad spec: {e}", file=err)
        return EXIT_SPEC
    try:
        document = _read_input(args.input, "input")
        context = _read_input(args.context, "context") if args.context else None
    except OSError as e:
        print(f"harmony transform: cannot read {e.filename}: {e.strerror}", file=err)
        return EXIT_INPUT
    except ValueError as e:
        print(f"harmony transform: bad input: {e}", file=err)
        return EXIT_INPUT
    if context is not None and not isinstance(context, dict):
        print(f"harmony transform: bad input: context {args.context} must be a JSON object", file=err)
        return EXIT_INPUT
    try:
        output = spec.apply(document, context)
    except TransformFailed as e:
        print(f"harmony transform: the spec failed on this input: {e}", file=err)
        return EXIT_TRANSFORM
    indent = None if args.compact else 2
    separators = (",", ":") if args.compact else None
    sys.stdout.write(json.dumps(output, indent=indent, separators=separators, ensure_ascii=False) + "\n")
    return 0


def add_transform(sub):
    p = sub.add_parser("transform", help="apply a JOLT spec to a JSON document and print the result")
    p.add_argument("spec", help="JOLT spec file (a chain: list of {operation, spec})")
    p.add_argument("input", nargs="?", help="input JSON file (default: stdin)")
    p.add_argument("--context", help="JSON object file exposed to modify-* specs as ^context")
    p.add_argument("--compact", action="store_true", help="print compact JSON on one line")
    p.set_defaults(func=cmd_transform)
