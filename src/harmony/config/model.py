"""The loaded configuration: plain attrs records, each remembering its source file."""

from __future__ import annotations

from pathlib import Path

import attr


@attr.s(auto_attribs=True)
class ProxySettings:
    id: str = "harmony"
    log_level: str = "info"
    pipelines_path: Path | None = None
    transforms_path: Path | None = None
    workers: int = 1
    #: Microseconds a serving process's reactor polls without sleeping once it has
    #: nothing to do (harmony.compat.spin); 0: never.
    poll_spin_us: int = 300
    #: Absolute: where state lives (the store, generated secrets); see load_config.
    state_dir: Path | None = None


@attr.s(auto_attribs=True)
class NetworkConfig:
    name: str
    source: str
    #: A Twisted server endpoint description ("tcp:8080:interface=127.0.0.1").
    listen: str | None = None
    raw: dict = attr.Factory(dict)
    #: False for a network whose table has errors (only in a config loaded for checking).
    valid: bool = True


@attr.s(auto_attribs=True)
class ComponentConfig:
    """An ``[endpoints.X]``, ``[backends.X]`` or ``[middleware.X]`` table."""

    name: str
    type: str
    options: dict
    source: str
    #: Table name used in messages, e.g. ``endpoints.api``.
    table: str
    targets: list = attr.Factory(list)
    raw: dict = attr.Factory(dict)


@attr.s(auto_attribs=True)
class PipelineConfig:
    name: str
    source: str
    description: str = ""
    networks: list = attr.Factory(list)
    endpoints: list = attr.Factory(list)
    middleware: list = attr.Factory(list)
    backends: list = attr.Factory(list)
    raw: dict = attr.Factory(dict)


@attr.s(auto_attribs=True)
class HarmonyConfig:
    path: Path
    base_dir: Path
    proxy: ProxySettings
    networks: dict
    pipelines: dict
    endpoints: dict
    backends: dict
    middleware: dict
    targets: dict
    management: dict = attr.Factory(dict)
    storage: dict = attr.Factory(dict)
    logging: dict = attr.Factory(dict)
    #: ``[services.*]`` / ``[endpoint_types.*]`` / ``[middleware_types.*]`` module specs.
    custom_types: dict = attr.Factory(dict)
    #: Every file read, in order (main file first).
    files: list = attr.Factory(list)
    #: Raw top-level tables by file, for types that read their own sections.
    raw: dict = attr.Factory(dict)
    #: Non-fatal problems found while loading (unknown keys): ``harmony check``
    #: prints them and the service logs them at start, with the runtime's own.
    warnings: list = attr.Factory(list)
    #: ``(table, name)`` of entries that were defined but failed to load (a bad
    #: port, a table that is not a table).  Only a config loaded for checking
    #: (``load_config(path, problems=[...])``) has any: references to them are
    #: not reported again as "unknown".
    broken: set = attr.Factory(set)

    @property
    def state_dir(self) -> Path:
        return self.proxy.state_dir or (self.base_dir / "var" / "harmony")

    @property
    def storage_path(self) -> Path:
        """``[storage.options] path`` (relative to the main file), else the state directory."""
        opts = self.storage.get("options", {}) if isinstance(self.storage, dict) else {}
        if "path" not in opts:
            return self.state_dir
        p = Path(opts["path"]).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)
