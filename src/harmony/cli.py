"""``harmony`` command line: check a config, show its routes, and tools.

Subcommands live in their own modules and register here with one line in
``COMMANDS`` (name -> "module:function" taking the argparse subparsers).
"""

from __future__ import annotations

import argparse
import os
import sys

from harmony.registry import load_object
from harmony.runtime import route_table

COMMANDS = {
    "check": "harmony.cli:add_check",
    "routes": "harmony.cli:add_routes",
    "transform": "harmony.transform.cli:add_transform",
    "jmix": "harmony.jmix.cli:add_jmix",
    "storage": "harmony.storage.migrate:add_storage",
    "deidentify": "harmony.deid.cli:add_deidentify",
}


def _load(config_path, state_dir=None, warnings=None):
    """(runtime, None), or (None, ConfigErrors with every problem of every section).

    *warnings*, a list, receives the warnings found on the way, even when
    there are errors too (a misspelt key is often why something else fails).
    """
    from harmony.config import ConfigErrors, load_config
    from harmony.management.settings import ManagementSettings, check_routes
    from harmony.runtime import build_runtime

    problems = []
    config = load_config(config_path, problems=problems, state_dir=state_dir)
    if config is None:
        return None, ConfigErrors(problems)
    # Build even when loading found problems: the components, pipelines and
    # routes of the sections that did load have problems of their own, and an
    # operator fixes them all in one pass.
    runtime = build_runtime(config, problems=problems)
    if warnings is not None:
        warnings.extend(runtime.warnings)
    try:
        check_routes(ManagementSettings.from_config(config), runtime)
    except ConfigErrors as e:
        problems.extend(e.problems)
    if problems:
        return None, ConfigErrors(problems)
    return runtime, None


def _print_routes(runtime, out):
    rows = route_table(runtime)
    cols = ["network", "listen", "prefix", "endpoint", "service", "pipeline"]
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
    out.write("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip() + "\n")
    for r in rows:
        out.write("  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip() + "\n")


def cmd_check(args) -> int:
    warnings: list = []
    runtime, errors = _load(args.config, args.state_dir, warnings)
    if errors is not None:
        print(f"{args.config}: INVALID", file=sys.stdout)
        print(errors.render(), file=sys.stdout)
        for w in warnings:
            print(f"warning: {w}")
        return 1
    cfg = runtime.config
    print(f"{cfg.path}: OK (proxy id {cfg.proxy.id!r}, {len(cfg.files)} file(s))")
    print(f"state directory: {cfg.state_dir}")
    print(f"networks ({len(cfg.networks)}):")
    for name, net in cfg.networks.items():
        print(f"  {name}: {net.listen or '(no HTTP listener)'}")
    print(f"pipelines ({len(runtime.pipelines)}):")
    for name, pc in cfg.pipelines.items():
        print(f"  {name}: endpoints={pc.endpoints} middleware={pc.middleware} backends={pc.backends}")
    print("routes:")
    _print_routes(runtime, sys.stdout)
    for w in runtime.warnings:
        print(f"warning: {w}")
    return 0


def cmd_routes(args) -> int:
    runtime, errors = _load(args.config, args.state_dir)
    if errors is not None:
        print(errors.render(), file=sys.stderr)
        return 1
    _print_routes(runtime, sys.stdout)
    return 0


def _state_dir_argument(parser):
    parser.add_argument("--state-dir", default=None,
                        help="where state lives (the store, generated secrets); default: $STATE_DIRECTORY, "
                             "then [proxy] state_dir, then var/harmony next to the config")


def add_check(sub):
    p = sub.add_parser("check", help="validate a configuration and summarise it")
    p.add_argument("-c", "--config", required=True)
    _state_dir_argument(p)
    p.set_defaults(func=cmd_check)


def add_routes(sub):
    p = sub.add_parser("routes", help="print the route table of a configuration")
    p.add_argument("-c", "--config", required=True)
    _state_dir_argument(p)
    p.set_defaults(func=cmd_routes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="harmony", description="Harmony healthcare proxy tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for spec in COMMANDS.values():
        load_object(spec)(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except BrokenPipeError:
        # `harmony check ... | head`: the reader left, which is not our error.
        # Point stdout at /dev/null so the interpreter's final flush is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
