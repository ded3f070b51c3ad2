"""Building a store from configuration: ``[storage.options]`` plus a component's own ``path``.

    [storage]
    backend = "filesystem"      # the only one (harmony.config.loader.STORAGE_BACKENDS)
    index = "sqlite"            # or "postgresql" (harmony.config.loader.STORAGE_INDEXES)
    [storage.options]
    path = "../var/harmony"     # ctx.storage_path
    min_free_mb = 512           # refuse new instances below this much free space
    fsync = true                # false only for throw-away test data
    threads = 4                 # storage thread pool size (and PostgreSQL connections per node)
    dsn = "host=db.example port=5432 dbname=harmony user=harmony"   # index = "postgresql" only
    password_file = "/run/secrets/harmony-db"                        # optional; or PGPASSWORD / .pgpass
    node = "node-a"             # this node's name on queue leases (default: the host name)
"""

from __future__ import annotations

from harmony.config.errors import ConfigErrors, OptionError, Problem
from harmony.config.loader import STORAGE_BACKENDS, STORAGE_INDEXES
from harmony.config.options import Options
from harmony.storage.database import SPARE_CONNECTIONS, PostgresDatabase, read_password_file
from harmony.storage.store import open_store


def store_from_context(ctx, options: Options):
    """The shared store a component uses: its ``path`` option, else ``[storage]``'s."""
    storage = ctx.config.storage if isinstance(ctx.config.storage, dict) else {}
    # The loader already refused anything else; checked again because a
    # runtime may be built from a config made in code.
    for key, supported in (("backend", STORAGE_BACKENDS), ("index", STORAGE_INDEXES)):
        value = storage.get(key, supported[0])
        if value not in supported:
            raise ConfigErrors([Problem(str(ctx.config.path), f"storage.{key}",
                                        f"{value!r} is not supported by this version of Harmony "
                                        f"(supported: {', '.join(map(repr, supported))})")])
    global_opts = Options(storage.get("options", {}), base_dir=ctx.base_dir)
    try:
        min_free_mb = global_opts.number("min_free_mb", 512, minimum=0)
        fsync = global_opts.bool("fsync", True)
        threads = global_opts.int("threads", 4, minimum=1, maximum=64)
        node = global_opts.str("node", "")
        database = database_from_options(storage.get("index", STORAGE_INDEXES[0]), global_opts, threads, node)
    except OptionError as e:
        raise ConfigErrors([Problem(str(ctx.config.path), f"storage.options.{e.key}", e.message)]) from None
    root = options.path("path", None) or ctx.storage_path
    try:
        return open_store(root, reactor=ctx.reactor, min_free_bytes=int(min_free_mb * 1024 * 1024), fsync=fsync,
                          threads=threads, database=database, node=node)
    except OSError as e:
        raise OptionError("path", f"cannot open the store at {root}: {e.strerror}") from None


def database_from_options(index: str, opts: Options, threads: int, node: str = ""):
    """None for the embedded sqlite (the store makes it), else the shared PostgreSQL."""
    if index != "postgresql":
        for key in ("dsn", "password_file"):
            if key in opts.raw:
                raise OptionError(key, 'only used with index = "postgresql"')
        return None
    dsn = opts.str("dsn", "")
    if not dsn:
        raise OptionError("dsn", 'index = "postgresql" needs a dsn (e.g. "host=db port=5432 dbname=harmony '
                                 'user=harmony")')
    password = None
    password_file = opts.path("password_file", None)
    if password_file is not None:
        try:
            password = read_password_file(password_file)
        except OSError as e:
            raise OptionError("password_file", f"cannot read {password_file}: {e.strerror}") from None
    return PostgresDatabase(dsn, password=password, max_connections=threads + SPARE_CONNECTIONS,
                            application_name=f"harmony {node}".strip()[:63])
