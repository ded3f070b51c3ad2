"""Building a store from configuration: ``[storage.options]`` plus a component's own ``path``.

    [storage]
    backend = "filesystem"      # the only one (harmony.config.loader.STORAGE_BACKENDS)
    index = "sqlite"            # the only one (harmony.config.loader.STORAGE_INDEXES)
    [storage.options]
    path = "../var/harmony"     # ctx.storage_path
    min_free_mb = 512           # refuse new instances below this much free space
    fsync = true                # false only for throw-away test data
    threads = 4                 # storage thread pool size
"""

from __future__ import annotations

from harmony.config.errors import ConfigErrors, OptionError, Problem
from harmony.config.loader import STORAGE_BACKENDS, STORAGE_INDEXES
from harmony.config.options import Options
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
    except OptionError as e:
        raise ConfigErrors([Problem(str(ctx.config.path), f"storage.options.{e.key}", e.message)]) from None
    root = options.path("path", None) or ctx.storage_path
    try:
        return open_store(root, reactor=ctx.reactor, min_free_bytes=int(min_free_mb * 1024 * 1024), fsync=fsync,
                          threads=threads)
    except OSError as e:
        raise OptionError("path", f"cannot open the store at {root}: {e.strerror}") from None
