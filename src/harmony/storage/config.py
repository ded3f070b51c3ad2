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
    # backend = "s3" only (harmony.storage.blobs): files also go to S3-compatible object storage
    s3_endpoint = "https://s3.eu-west-1.amazonaws.com"
    s3_bucket = "harmony-archive"
    s3_region = "eu-west-1"
    s3_prefix = ""
    s3_credentials_file = "/run/secrets/harmony-s3"   # ACCESS_KEY:SECRET_KEY; else AWS_ACCESS_KEY_ID/...
    s3_cache_max_mb = 0         # bound on the local folder in front of S3 (0: unbounded); never evicts
                                # a file not yet uploaded
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import attr

from harmony.config.errors import ConfigErrors, OptionError, Problem
from harmony.config.loader import STORAGE_BACKENDS, STORAGE_INDEXES
from harmony.config.options import Options
from harmony.storage.database import SPARE_CONNECTIONS, PostgresDatabase, read_password_file
from harmony.storage.nodes import default_node
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
    root = options.path("path", None) or ctx.storage_path
    try:
        min_free_mb = global_opts.number("min_free_mb", 512, minimum=0)
        fsync = global_opts.bool("fsync", True)
        threads = global_opts.int("threads", 4, minimum=1, maximum=64)
        node = global_opts.str("node", "")
        # Unset: the host name + a digest of the folder (harmony.storage.nodes), per worker process too.
        processes = process_name(ctx.config, node or default_node(Path(root).resolve()))
        if processes is not None:
            node = processes
        database = database_from_options(storage.get("index", STORAGE_INDEXES[0]), global_opts, threads, node)
        blobs = blobs_from_options(storage.get("backend", STORAGE_BACKENDS[0]), global_opts)
        cache_mb = global_opts.number("s3_cache_max_mb", 0, minimum=0)
        if cache_mb and blobs is None:
            raise OptionError("s3_cache_max_mb", 'only used with backend = "s3"')
    except OptionError as e:
        raise ConfigErrors([Problem(str(ctx.config.path), f"storage.options.{e.key}", e.message)]) from None
    try:
        return open_store(root, reactor=ctx.reactor, min_free_bytes=int(min_free_mb * 1024 * 1024), fsync=fsync,
                          threads=threads, database=database, node=node, blobs=blobs,
                          per_process=processes is not None, cache_max_bytes=int(cache_mb * 1024 * 1024))
    except OSError as e:
        raise OptionError("path", f"cannot open the store at {root}: {e.strerror}") from None


def process_name(config, node: str) -> str | None:
    """This process's name on the store when ``[proxy] workers`` > 1, else None.

    Worker processes share the store folder and its index: each must clear
    only its own temp files and crash markers on start, and take back only
    its own queue leases, exactly like nodes sharing a PostgreSQL index.  The
    worker pool tells each process which one it is in ``HARMONY_WORKER``
    (harmony.workers; the main process is 0), which is stable across a
    worker's restarts, so a restarted worker cleans up after the one it
    replaces.
    """
    proxy = getattr(config, "proxy", None)
    if getattr(proxy, "workers", 1) <= 1:
        return None
    return f"{node or socket.gethostname()}.w{os.environ.get('HARMONY_WORKER', '0')}"


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


def blobs_from_options(backend: str, opts: Options):
    """None for plain files, else the S3-compatible bucket the files also go to."""
    if backend != "s3":
        return None
    from harmony.storage.blobs import S3Blobs, read_credentials
    access = secret = None
    credentials = opts.path("s3_credentials_file", None)
    if credentials is not None:
        try:
            access, secret = read_credentials(credentials)
        except (OSError, ValueError) as e:
            raise OptionError("s3_credentials_file", f"cannot use {credentials}: "
                                                     f"{getattr(e, 'strerror', None) or e}") from None
    return S3Blobs(opts.str("s3_endpoint"), opts.str("s3_bucket"), opts.str("s3_region", "us-east-1"),
                   access_key=access, secret_key=secret, prefix=opts.str("s3_prefix", ""))


@attr.s(auto_attribs=True, frozen=True)
class SharedParts:
    """What a component beside the instance store (the JMIX index, the DICOMweb
    metadata cache) needs to be shared by a cluster's nodes."""

    database: object
    blobs: object
    node: str


#: Connections each such component may hold (its work is small next to ingest's).
AUX_CONNECTIONS = 2


def shared_parts(ctx, purpose: str, folder) -> SharedParts | None:
    """The cluster's database (a small pool of its own), bucket and node id when
    ``[storage] index = "postgresql"``; None on a single node (the component keeps
    its own sqlite file)."""
    storage = ctx.config.storage if isinstance(ctx.config.storage, dict) else {}
    if storage.get("index", STORAGE_INDEXES[0]) != "postgresql":
        return None
    opts = Options(storage.get("options", {}), base_dir=ctx.base_dir)
    try:
        node = opts.str("node", "")
        database = database_from_options("postgresql", opts, AUX_CONNECTIONS, f"{node} {purpose}".strip())
        blobs = blobs_from_options(storage.get("backend", STORAGE_BACKENDS[0]), opts)
    except OptionError as e:
        raise ConfigErrors([Problem(str(ctx.config.path), f"storage.options.{e.key}", e.message)]) from None
    return SharedParts(database, blobs, node or default_node(folder))
