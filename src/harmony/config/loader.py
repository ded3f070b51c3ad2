"""Read a Harmony TOML configuration (main file plus a pipelines folder).

The format is Harmony's own, so existing Harmony configs load unchanged:
endpoints and backends name their type with ``service`` or ``type``, options sit
inline or under ``.options``, pipelines may list middleware as ``"name"`` or
``"middleware.name"``, and registration tables (``[services.*]``,
``[middleware_types.*]``, ...) are accepted.

Loading collects every problem it can find before giving up, so an operator
fixes a config in one pass rather than one error per restart.
"""

from __future__ import annotations

from pathlib import Path

import tomlkit
from tomlkit.exceptions import ParseError

from harmony.config.errors import ConfigErrors, Problem
from harmony.config.model import (ComponentConfig, HarmonyConfig, NetworkConfig, PipelineConfig,
                                  ProxySettings)

#: Tables that hold named components; a name may be defined in one file only.
COMPONENT_TABLES = ("pipelines", "endpoints", "backends", "middleware", "targets")
#: Registration tables Harmony configs carry; ``module = ""`` means built-in.
TYPE_TABLES = {"services": None, "endpoint_types": "endpoint", "service_types": None,
               "backend_types": "backend", "middleware_types": "middleware"}
#: Keys each fixed table knows; anything else is warned about (a typo such as
#: ``log_levl`` or ``bind_adress`` would otherwise be silently ignored).
KNOWN_KEYS = {
    "proxy": ("id", "log_level", "pipelines_path", "transforms_path", "workers"),
    "logging": ("log_to_file", "log_file_path", "format"),
    "http": ("bind_address", "bind_port", "tls", "head_timeout_secs", "body_timeout_secs", "body_min_rate"),
    "tls": ("cert", "key"),
}
MAIN_TABLES = ("proxy", "network", "management", "storage", "logging", "pipelines_path", "transforms_path")
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")


def read_toml(path: Path, problems: list) -> dict | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        problems.append(Problem(str(path), "", f"cannot read: {e.strerror}"))
        return None
    except UnicodeDecodeError:
        problems.append(Problem(str(path), "", "is not UTF-8 text"))
        return None
    try:
        # unwrap(): tomlkit's item types upset Twisted's endpoint parser and
        # isinstance checks; everything past here sees plain Python values.
        return tomlkit.parse(text).unwrap()
    except ParseError as e:
        problems.append(Problem(str(path), "", f"invalid TOML: {e}"))
        return None


def _resolve(base: Path, value) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _component(kind: str, name: str, table: dict, source: str, problems: list) -> ComponentConfig | None:
    where = f"{kind}.{name}"
    if not isinstance(table, dict):
        problems.append(Problem(source, where, "must be a table"))
        return None
    type_name = table.get("service", table.get("type"))
    if kind == "middleware" and type_name is None:
        type_name = name  # [middleware.passthru] with no type is the passthru type
    if type_name is None:
        problems.append(Problem(source, where, "needs a 'service' (or 'type') naming its type"))
        return None
    if not isinstance(type_name, str):
        problems.append(Problem(source, f"{where}.service", "must be a string"))
        return None
    options = table.get("options", {})
    if not isinstance(options, dict):
        problems.append(Problem(source, f"{where}.options", "must be a table"))
        return None
    # Options may also sit inline, next to the type (Harmony accepts both).
    inline = {k: v for k, v in table.items() if k not in ("service", "type", "options", "targets")}
    merged = {**inline, **options}
    targets = table.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        problems.append(Problem(source, f"{where}.targets", "must be a list of target names"))
        targets = []
    return ComponentConfig(name=name, type=type_name, options=merged, source=source,
                           table=where, targets=targets, raw=table)


def _pipeline(name: str, table: dict, source: str, problems: list) -> PipelineConfig | None:
    where = f"pipelines.{name}"
    if not isinstance(table, dict):
        problems.append(Problem(source, where, "must be a table"))
        return None
    lists = {}
    for key in ("networks", "endpoints", "middleware", "backends"):
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(Problem(source, f"{where}.{key}", "must be a list of names"))
            value = []
        lists[key] = value
    lists["middleware"] = [m.removeprefix("middleware.") for m in lists["middleware"]]
    description = table.get("description", "")
    return PipelineConfig(name=name, source=source, description=str(description), raw=table, **lists)


def _unknown_keys(table, known, source: str, where: str, warnings: list) -> None:
    if isinstance(table, dict):
        unknown = sorted(k for k in table if k not in known)
        if unknown:
            warnings.append(Problem(source, where, f"unknown key(s) ignored: {', '.join(unknown)}"))


def _usable_listen(listen: str, source: str, key: str, problems: list) -> bool:
    """Parse an endpoint description the way twistd will, without listening, so
    a typo or a missing certificate is reported before anything starts.
    ``systemd:`` descriptions are left alone: they only parse under systemd."""
    if listen.lstrip().startswith("systemd:"):
        return True
    from twisted.internet.endpoints import serverFromString
    try:
        serverFromString(None, listen)
    except Exception as e:  # noqa: BLE001 - any parse failure (ValueError, OSError, SSL errors)
        problems.append(Problem(source, key, f"is not a usable Twisted endpoint description {listen!r}: {e}"))
        return False
    return True


def _slow_client_bounds(http: dict, source: str, where: str, problems: list) -> bool:
    """``head_timeout_secs``, ``body_timeout_secs`` (0: no body clock) and ``body_min_rate``
    (bytes/s; 0: one byte per window) of ``[network.X.http]``; see harmony.web.streaming."""
    ok = True
    for key, low in (("head_timeout_secs", 0.001), ("body_timeout_secs", 0.0), ("body_min_rate", 0.0)):
        value = http.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            problems.append(Problem(source, f"{where}.{key}", f"must be a number >= {low:g}, got {value!r}"))
            ok = False
    return ok


def _network(name: str, table: dict, source: str, problems: list, warnings: list | None = None) -> NetworkConfig | None:
    warnings = [] if warnings is None else warnings
    where = f"network.{name}"
    if not isinstance(table, dict):
        problems.append(Problem(source, where, "must be a table"))
        return None
    listen = table.get("listen")
    if listen is not None:
        if not isinstance(listen, str) or not listen.strip():
            problems.append(Problem(source, f"{where}.listen",
                                    "must be a Twisted endpoint description such as 'tcp:8080:interface=127.0.0.1'"))
            return None
        if not _usable_listen(listen, source, f"{where}.listen", problems):
            return None
        return NetworkConfig(name=name, source=source, listen=listen, raw=table)
    http = table.get("http")
    if http is None:
        # A network without HTTP (e.g. only used to group DIMSE pipelines) is legal.
        return NetworkConfig(name=name, source=source, listen=None, raw=table)
    if not isinstance(http, dict):
        problems.append(Problem(source, f"{where}.http", "must be a table"))
        return None
    _unknown_keys(http, KNOWN_KEYS["http"], source, f"{where}.http", warnings)
    address = http.get("bind_address", "127.0.0.1")
    port = http.get("bind_port", 8080)
    ok = _slow_client_bounds(http, source, f"{where}.http", problems)
    if not isinstance(address, str) or not address:
        problems.append(Problem(source, f"{where}.http.bind_address", "must be an IP address string"))
        ok = False
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        problems.append(Problem(source, f"{where}.http.bind_port", f"must be a port number 0-65535, got {port!r}"))
        ok = False
    if not ok:
        return None
    iface = address.replace(":", "\\:")  # IPv6 colons must be escaped in endpoint strings
    listen = f"tcp:{port}:interface={iface}"
    tls_where, tls = (f"{where}.http.tls", http["tls"]) if "tls" in http else (f"{where}.tls", table.get("tls"))
    if tls is not None:
        if not isinstance(tls, dict) or not isinstance(tls.get("cert"), str) or not tls["cert"]:
            # Without this, a misspelt cert key would serve plain HTTP where HTTPS was asked for.
            problems.append(Problem(source, f"{tls_where}.cert",
                                    "is required (a PEM certificate path) when a tls table is given"))
            return None
        _unknown_keys(tls, KNOWN_KEYS["tls"], source, tls_where, warnings)
    if isinstance(tls, dict) and tls.get("cert"):
        # Colons separate endpoint-string fields, so they are escaped in paths too.
        cert = str(_resolve(Path(source).parent, tls["cert"])).replace(":", "\\:")
        key = str(_resolve(Path(source).parent, tls.get("key", tls["cert"]))).replace(":", "\\:")
        listen = f"ssl:{port}:interface={iface}:certKey={cert}:privateKey={key}"
        if not _usable_listen(listen, source, f"{where}.http.tls", problems):
            return None
    return NetworkConfig(name=name, source=source, listen=listen, raw=table)


def _logging(raw, source: str, base: Path, problems: list, warnings: list | None = None) -> dict:
    """``[logging]``: ``log_to_file``, ``log_file_path`` (relative to the config
    file), ``format`` (``text`` or ``json`` lines).  Checked here so a typo is a
    refusal to start, not a log file that silently never appears."""
    if not isinstance(raw, dict):
        problems.append(Problem(source, "logging", "must be a table"))
        return {}
    _unknown_keys(raw, KNOWN_KEYS["logging"], source, "logging", [] if warnings is None else warnings)
    out = dict(raw)
    to_file = raw.get("log_to_file", False)
    if not isinstance(to_file, bool):
        problems.append(Problem(source, "logging.log_to_file", f"must be true or false, got {to_file!r}"))
        to_file = False
    fmt = raw.get("format", "text")
    if fmt not in LOG_FORMATS:
        problems.append(Problem(source, "logging.format", f"must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}"))
    path = raw.get("log_file_path")
    if path is not None and (not isinstance(path, str) or not path):
        problems.append(Problem(source, "logging.log_file_path", "must be a file path string"))
        path = None
    if to_file:
        if path is None:
            problems.append(Problem(source, "logging.log_file_path", "is required when log_to_file = true"))
        else:
            resolved = _resolve(base, path)
            if not resolved.parent.is_dir():
                problems.append(Problem(source, "logging.log_file_path",
                                        f"folder {resolved.parent} does not exist"))
            out["log_file_path"] = str(resolved)
    out["log_to_file"] = to_file
    out["format"] = fmt
    return out


STORAGE_BACKENDS = ("filesystem",)


def _storage(raw, source: str, problems: list) -> dict:
    """``[storage]``: ``backend = "filesystem"`` and ``[storage.options] path``."""
    if not isinstance(raw, dict):
        problems.append(Problem(source, "storage", "must be a table"))
        return {}
    backend = raw.get("backend", "filesystem")
    if backend not in STORAGE_BACKENDS:
        problems.append(Problem(source, "storage.backend",
                                f"must be one of {', '.join(STORAGE_BACKENDS)}, got {backend!r}"))
    options = raw.get("options", {})
    if not isinstance(options, dict):
        problems.append(Problem(source, "storage.options", "must be a table"))
        return {**raw, "options": {}}
    path = options.get("path")
    if path is not None and (not isinstance(path, str) or not path):
        problems.append(Problem(source, "storage.options.path", "must be a folder path string"))
        return {**raw, "options": {k: v for k, v in options.items() if k != "path"}}
    return raw


def load_config(path: str | Path) -> HarmonyConfig:
    """Load and structurally check a configuration; raise :class:`ConfigErrors`.

    Types and cross-references are checked later, when the runtime is built
    (:func:`harmony.runtime.build_runtime`), because only the type classes know
    their options.
    """
    path = Path(path).resolve()
    problems: list[Problem] = []
    warnings: list[Problem] = []
    main = read_toml(path, problems)
    if main is None:
        raise ConfigErrors(problems)
    base = path.parent
    src = str(path)

    proxy_raw = main.get("proxy", {})
    if not isinstance(proxy_raw, dict):
        problems.append(Problem(src, "proxy", "must be a table"))
        proxy_raw = {}
    _unknown_keys(proxy_raw, KNOWN_KEYS["proxy"], src, "proxy", warnings)
    proxy = ProxySettings(id=str(proxy_raw.get("id", "harmony")))
    level = str(proxy_raw.get("log_level", "info")).lower()
    if level not in LOG_LEVELS:
        problems.append(Problem(src, "proxy.log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}"))
    proxy.log_level = level
    workers = proxy_raw.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 256:
        problems.append(Problem(src, "proxy.workers", f"must be an integer 1-256, got {workers!r}"))
        workers = 1
    proxy.workers = workers
    # Harmony has carried these both in [proxy] and at the top level.
    for key in ("pipelines_path", "transforms_path"):
        value = proxy_raw.get(key, main.get(key))
        if value is not None:
            if not isinstance(value, str):
                problems.append(Problem(src, f"proxy.{key}", "must be a path string"))
            else:
                setattr(proxy, key, _resolve(base, value))

    files = [path]
    documents = [(path, main)]
    if proxy.pipelines_path is not None:
        folder = proxy.pipelines_path
        if not folder.is_dir():
            problems.append(Problem(src, "proxy.pipelines_path", f"{folder} is not a directory"))
        else:
            for f in sorted(folder.glob("*.toml")):
                if f.resolve() == path:
                    continue
                doc = read_toml(f, problems)
                files.append(f)
                if doc is not None:
                    documents.append((f, doc))

    seen: dict[tuple[str, str], str] = {}
    tables: dict[str, dict] = {t: {} for t in COMPONENT_TABLES}
    networks: dict[str, NetworkConfig] = {}
    custom_types: dict[str, dict] = {}
    for fpath, doc in documents:
        fsrc = str(fpath)
        known = COMPONENT_TABLES + ("network",) + tuple(TYPE_TABLES) + (MAIN_TABLES if fpath == path else ())
        for key in sorted(k for k in doc if k not in known):
            warnings.append(Problem(fsrc, key, "unknown top-level key, ignored"
                                    + ("" if fpath == path else " (in a pipeline file)")))
        for table in COMPONENT_TABLES + ("network",):
            section = doc.get(table, {})
            if not isinstance(section, dict):
                problems.append(Problem(fsrc, table, "must be a table of named entries"))
                continue
            for name, value in section.items():
                first = seen.get((table, name))
                if first is not None:
                    problems.append(Problem(fsrc, f"{table}.{name}",
                                            f"is defined twice: here and in {first}"))
                    continue
                seen[(table, name)] = fsrc
                if table == "network":
                    net = _network(name, value, fsrc, problems, warnings)
                    if net:
                        networks[name] = net
                elif table == "pipelines":
                    p = _pipeline(name, value, fsrc, problems)
                    if p:
                        tables["pipelines"][name] = p
                elif table == "targets":
                    if not isinstance(value, dict):
                        problems.append(Problem(fsrc, f"targets.{name}", "must be a table"))
                    else:
                        tables["targets"][name] = {**value, "_source": fsrc}
                else:
                    c = _component(table, name, value, fsrc, problems)
                    if c:
                        tables[table][name] = c
        for table, kind in TYPE_TABLES.items():
            section = doc.get(table, {})
            if not isinstance(section, dict):
                problems.append(Problem(fsrc, table, "must be a table"))
                continue
            for name, value in section.items():
                module = value.get("module", "") if isinstance(value, dict) else None
                if not isinstance(module, str):
                    problems.append(Problem(fsrc, f"{table}.{name}.module",
                                            "must be a string ('' for built-in, or 'package.module:Class')"))
                    continue
                if module:
                    custom_types[name] = {"module": module, "kind": kind, "source": fsrc,
                                          "table": f"{table}.{name}"}

    def section(key):
        value = main.get(key, {})
        if not isinstance(value, dict):
            problems.append(Problem(src, key, "must be a table"))
            return {}
        return value

    config = HarmonyConfig(
        path=path, base_dir=base, proxy=proxy, networks=networks,
        pipelines=tables["pipelines"], endpoints=tables["endpoints"], backends=tables["backends"],
        middleware=tables["middleware"], targets=tables["targets"],
        management=section("management"), storage=_storage(main.get("storage", {}), src, problems),
        logging=_logging(main.get("logging", {}), src, base, problems, warnings),
        custom_types=custom_types, files=files, raw={str(f): d for f, d in documents}, warnings=warnings,
    )
    if problems:
        raise ConfigErrors(problems)
    return config
