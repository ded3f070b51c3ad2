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

import os
from pathlib import Path

import tomlkit
from tomlkit.exceptions import ParseError

from harmony.config.errors import ConfigErrors, Problem, unknown_key_problems
from harmony.config.model import ComponentConfig, HarmonyConfig, NetworkConfig, PipelineConfig, ProxySettings

#: Tables that hold named components; a name may be defined in one file only.
COMPONENT_TABLES = ("pipelines", "endpoints", "backends", "middleware", "targets")
#: Registration tables Harmony configs carry; ``module = ""`` means built-in.
TYPE_TABLES = {"services": None, "endpoint_types": "endpoint", "service_types": None,
               "backend_types": "backend", "middleware_types": "middleware"}
#: A spin longer than this is a core given away for little (harmony.compat.spin).
MAX_POLL_SPIN_US = 5000

#: Keys each fixed table knows; anything else is warned about (a typo such as
#: ``log_levl`` or ``bind_adress`` would otherwise be silently ignored).
KNOWN_KEYS = {
    "proxy": ("id", "log_level", "pipelines_path", "transforms_path", "workers", "state_dir", "poll_spin_us"),
    "logging": ("log_to_file", "log_file_path", "format"),
    "network": ("listen", "http", "tls"),
    "http": ("bind_address", "bind_port", "tls", "head_timeout_secs", "body_timeout_secs", "body_min_rate"),
    "tls": ("cert", "key"),
    "pipelines": ("description", "networks", "endpoints", "middleware", "backends"),
    # Read by harmony.targets.pool.build_target and harmony.backends.target_tls:
    # a key added there is added here, or it draws an "unknown key" warning.
    "targets": ("url", "host", "port", "aet", "weight", "headers",
                "tls_ca_file", "tls_cert_file", "tls_key_file"),
    "storage": ("backend", "index", "options"),
    "storage.options": ("path", "min_free_mb", "fsync", "threads", "dsn", "password_file", "node",
                        "s3_endpoint", "s3_bucket", "s3_region", "s3_prefix", "s3_credentials_file", "s3_cache_max_mb"),
}
#: What ``[storage]`` accepts, in one place (harmony.storage.config builds from
#: the same tuples).  A value outside them is refused, never quietly replaced by
#: the default: ``index = "postgresql"`` must not start a node on sqlite.
STORAGE_BACKENDS = ("filesystem", "s3")
STORAGE_INDEXES = ("sqlite", "postgresql")
MAIN_TABLES = ("proxy", "network", "management", "storage", "logging", "pipelines_path", "transforms_path")
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical")
#: A string value starting with this is a path in the state directory.
STATE_DIR_PLACEHOLDER = "{state_dir}"
#: Where the state directory is when nothing says (relative to the main file):
#: the folder the store always defaulted to.
DEFAULT_STATE_DIR = "var/harmony"


def state_dir_override(environ=None) -> str | None:
    """The state directory the process was given, if any: ``$STATE_DIRECTORY``,
    which systemd sets for ``StateDirectory=`` (several are colon-separated:
    the first is Harmony's).  ``--state-dir`` sets it too."""
    environ = os.environ if environ is None else environ
    value = environ.get("STATE_DIRECTORY", "")
    return value.split(":", 1)[0] or None


def _expand_state_dir(value, state_dir: Path):
    """Replace a leading ``{state_dir}`` in every string of a parsed document."""
    if isinstance(value, dict):
        return {k: _expand_state_dir(v, state_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_state_dir(v, state_dir) for v in value]
    if isinstance(value, str) and value.startswith(STATE_DIR_PLACEHOLDER):
        rest = value[len(STATE_DIR_PLACEHOLDER):].lstrip("/")
        return str(state_dir / rest) if rest else str(state_dir)
    return value
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


def _pipeline(name: str, table: dict, source: str, problems: list, warnings: list) -> PipelineConfig | None:
    where = f"pipelines.{name}"
    if not isinstance(table, dict):
        problems.append(Problem(source, where, "must be a table"))
        return None
    _unknown_keys(table, KNOWN_KEYS["pipelines"], source, where, warnings)
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
    warnings.extend(unknown_key_problems(table, known, source, where))


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
    _unknown_keys(table, KNOWN_KEYS["network"], source, where, warnings)
    listen = table.get("listen")
    if listen is not None:
        if not isinstance(listen, str) or not listen.strip():
            problems.append(Problem(source, f"{where}.listen",
                                    "must be a Twisted endpoint description such as 'tcp:8080:interface=127.0.0.1'"))
            return None
        if not _usable_listen(listen, source, f"{where}.listen", problems):
            return None
        http = table.get("http")
        if isinstance(http, dict) and not _slow_client_bounds(http, source, f"{where}.http", problems):
            return None  # its slow-client bounds apply to a listen= network too
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


def _supported(value, supported: tuple, source: str, key: str, problems: list) -> None:
    if value not in supported:
        problems.append(Problem(source, key, f"{value!r} is not supported by this version of Harmony "
                                             f"(supported: {', '.join(map(repr, supported))})"))


def _storage(raw, source: str, problems: list) -> dict:
    """``[storage]``: ``backend``, ``index`` and ``[storage.options]``.

    Unknown keys here are errors, not warnings: a misspelt ``path`` or an
    unsupported ``index`` would otherwise put patient data somewhere the
    operator did not ask for, without a word.
    """
    if not isinstance(raw, dict):
        problems.append(Problem(source, "storage", "must be a table"))
        return {}
    problems.extend(unknown_key_problems(raw, KNOWN_KEYS["storage"], source, "storage", refused=True))
    _supported(raw.get("backend", STORAGE_BACKENDS[0]), STORAGE_BACKENDS, source, "storage.backend", problems)
    _supported(raw.get("index", STORAGE_INDEXES[0]), STORAGE_INDEXES, source, "storage.index", problems)
    options = raw.get("options", {})
    if not isinstance(options, dict):
        problems.append(Problem(source, "storage.options", "must be a table"))
        return {**raw, "options": {}}
    problems.extend(unknown_key_problems(options, KNOWN_KEYS["storage.options"], source, "storage.options",
                                         refused=True))
    if raw.get("index", STORAGE_INDEXES[0]) == "postgresql":
        dsn = options.get("dsn")
        if not isinstance(dsn, str) or not dsn.strip():
            problems.append(Problem(source, "storage.options.dsn", 'index = "postgresql" needs a dsn, e.g. '
                                    '"host=db.example port=5432 dbname=harmony user=harmony"'))
    else:
        problems.extend(Problem(source, f"storage.options.{key}", 'only used with index = "postgresql"')
                        for key in ("dsn", "password_file") if key in options)
    s3_keys = [k for k in KNOWN_KEYS["storage.options"] if k.startswith("s3_")]
    if raw.get("backend", STORAGE_BACKENDS[0]) == "s3":
        for key in ("s3_endpoint", "s3_bucket"):
            if not isinstance(options.get(key), str) or not options[key].strip():
                problems.append(Problem(source, f"storage.options.{key}", 'backend = "s3" needs it'))
    else:
        problems.extend(Problem(source, f"storage.options.{key}", 'only used with backend = "s3"')
                        for key in s3_keys if key in options)
    path = options.get("path")
    if path is not None and (not isinstance(path, str) or not path):
        problems.append(Problem(source, "storage.options.path", "must be a folder path string"))
        return {**raw, "options": {k: v for k, v in options.items() if k != "path"}}
    return raw


def load_config(path: str | Path, *, problems: list | None = None, state_dir: str | Path | None = None
                ) -> HarmonyConfig | None:
    """Load and structurally check a configuration; raise :class:`ConfigErrors`.

    Types and cross-references are checked later, when the runtime is built
    (:func:`harmony.runtime.build_runtime`), because only the type classes know
    their options.

    With a *problems* list, nothing is raised: problems are appended to it and
    the configuration is returned as far as it could be read (broken tables are
    left out and named in ``config.broken``), so ``harmony check`` can go on and
    report the problems of every other section too.  None when the main file
    cannot be read at all.

    The state directory (the store, generated secrets) is *state_dir* if
    given, else ``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``), else
    ``[proxy] state_dir`` relative to the main file, else ``var/harmony`` next to
    it.  A string value starting with ``{state_dir}`` is a path inside it.
    """
    collect = problems is not None
    path = Path(path).resolve()
    problems = [] if problems is None else problems
    warnings: list[Problem] = []
    main = read_toml(path, problems)
    if main is None:
        if collect:
            return None
        raise ConfigErrors(problems)
    base = path.parent
    src = str(path)

    proxy_raw = main.get("proxy", {})
    if not isinstance(proxy_raw, dict):
        problems.append(Problem(src, "proxy", "must be a table"))
        proxy_raw = {}
    _unknown_keys(proxy_raw, KNOWN_KEYS["proxy"], src, "proxy", warnings)
    proxy = ProxySettings(id=str(proxy_raw.get("id", "harmony")))
    configured = proxy_raw.get("state_dir", DEFAULT_STATE_DIR)
    if not isinstance(configured, str) or not configured:
        problems.append(Problem(src, "proxy.state_dir", "must be a folder path string"))
        configured = DEFAULT_STATE_DIR
    given = state_dir if state_dir is not None else state_dir_override()
    proxy.state_dir = Path(given).resolve() if given else _resolve(base, configured).resolve()
    level = str(proxy_raw.get("log_level", "info")).lower()
    if level not in LOG_LEVELS:
        problems.append(Problem(src, "proxy.log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}"))
    proxy.log_level = level
    workers = proxy_raw.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 256:
        problems.append(Problem(src, "proxy.workers", f"must be an integer 1-256, got {workers!r}"))
        workers = 1
    proxy.workers = workers
    spin = proxy_raw.get("poll_spin_us", proxy.poll_spin_us)
    if isinstance(spin, bool) or not isinstance(spin, int) or not 0 <= spin <= MAX_POLL_SPIN_US:
        problems.append(Problem(src, "proxy.poll_spin_us",
                                f"must be an integer 0-{MAX_POLL_SPIN_US} (microseconds), got {spin!r}"))
    else:
        proxy.poll_spin_us = spin
    # Harmony has carried these both in [proxy] and at the top level.
    for key in ("pipelines_path", "transforms_path"):
        value = proxy_raw.get(key, main.get(key))
        if value is not None:
            if not isinstance(value, str):
                problems.append(Problem(src, f"proxy.{key}", "must be a path string"))
            else:
                setattr(proxy, key, _resolve(base, value))

    main = _expand_state_dir(main, proxy.state_dir)
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
                if doc is not None:
                    doc = _expand_state_dir(doc, proxy.state_dir)
                files.append(f)
                if doc is not None:
                    documents.append((f, doc))

    seen: dict[tuple[str, str], str] = {}
    broken: set[tuple[str, str]] = set()
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
            entries = doc.get(table, {})
            if not isinstance(entries, dict):
                problems.append(Problem(fsrc, table, "must be a table of named entries"))
                continue
            for name, value in entries.items():
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
                    else:
                        # Kept as a placeholder so a check still places its
                        # routes and reports their conflicts.
                        broken.add((table, name))
                        networks[name] = NetworkConfig(name=name, source=fsrc, listen=None,
                                                       raw=value if isinstance(value, dict) else {}, valid=False)
                elif table == "pipelines":
                    p = _pipeline(name, value, fsrc, problems, warnings)
                    if p:
                        tables["pipelines"][name] = p
                elif table == "targets":
                    if not isinstance(value, dict):
                        problems.append(Problem(fsrc, f"targets.{name}", "must be a table"))
                        broken.add((table, name))
                    else:
                        _unknown_keys(value, KNOWN_KEYS["targets"], fsrc, f"targets.{name}", warnings)
                        tables["targets"][name] = {**value, "_source": fsrc}
                else:
                    c = _component(table, name, value, fsrc, problems)
                    if c:
                        tables[table][name] = c
                    else:
                        broken.add((table, name))
        for table, kind in TYPE_TABLES.items():
            types = doc.get(table, {})
            if not isinstance(types, dict):
                problems.append(Problem(fsrc, table, "must be a table"))
                continue
            for name, value in types.items():
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
        broken=broken,
    )
    if problems and not collect:
        raise ConfigErrors(problems)
    return config
