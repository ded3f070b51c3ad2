"""Hot reload: re-read and validate the whole configuration, then swap what changed.

Validation is the same as at start-up (load, build every component, place every
route, check ``[management]``), so a config that would not start is never
applied: the old one keeps serving and the errors are logged, returned to the
caller (``POST /admin/reload``) and counted (``harmony_reloads_total``).

On success, without dropping anything in flight:

* networks whose listen description is unchanged keep their socket and open
  connections; their router's ``routes`` list is swapped in one assignment, so
  a request sees either the old table or the new one.  Changed networks are
  re-bound, removed ones stop listening (open connections finish).
* backends whose configuration (options, type, target tables) is unchanged are
  kept as they are: connection pool, target health and circuit state.  Changed
  ones are rebuilt (carrying over the state of targets that did not change);
  the old objects stay usable by requests already holding them and are closed
  after ``RETIRE_SECS``.
* self-listening endpoints (DIMSE) whose configuration is unchanged keep their
  listener and associations and are pointed at their new pipeline; changed
  ones are restarted.
* the management API takes new settings (token) at once and re-binds only if
  its listener changed.
"""

from __future__ import annotations

import time

from twisted.application.service import Service
from twisted.internet import defer

from harmony.config import ConfigErrors, load_config
from harmony.log import get_logger, set_level
from harmony.runtime import build_runtime

log = get_logger("harmony.reload")

#: Retired backends are closed this long after a reload (in-flight requests finish first).
RETIRE_SECS = 60.0


def _component_key(config, comp) -> tuple:
    targets = tuple((n, tuple(sorted((k, repr(v)) for k, v in config.targets.get(n, {}).items() if k != "_source")))
                    for n in comp.targets)
    return (comp.type, repr(sorted(comp.options.items())), targets)


@defer.inlineCallbacks
def reload(service):
    from harmony.management.settings import ManagementSettings, check_routes

    started = time.time()
    try:
        config = load_config(service.config_path)
        settings = ManagementSettings.from_config(config)
        runtime = build_runtime(config, service.reactor)
        check_routes(settings, runtime)
    except ConfigErrors as e:
        errors = [str(p) for p in e.problems]
        log.error("reload failed, keeping the running configuration:\n{errors}", errors="\n".join(errors))
        service.metrics.reloaded(False)
        service.last_reload = {"ok": False, "at": started, "errors": errors}
        return dict(service.last_reload)
    try:
        changes = apply(service, runtime, settings)
        for warning in runtime.warnings:  # typos in the new config, as at start-up
            log.warn("configuration warning: {warning}", warning=str(warning))
    except Exception:  # a bug, not a config problem: say so rather than leave a silent half-swap
        log.failure("reload failed while applying the new configuration")
        service.metrics.reloaded(False)
        service.last_reload = {"ok": False, "at": started,
                               "errors": ["internal error while applying the configuration (see the log)"]}
        return dict(service.last_reload)
    errors = []
    pending = [svc.listening for svc in changes.pop("_started") if svc.listening is not None]
    results = yield defer.DeferredList(pending, consumeErrors=True)
    for ok, value in results:
        if not ok:
            errors.append(f"cannot listen: {value.getErrorMessage()}")
    ok = not errors
    service.metrics.reloaded(ok)
    service.last_reload = {"ok": ok, "at": started, "errors": errors, "changes": changes}
    if ok:
        log.info("configuration reloaded: {summary}", summary=_summary(changes))
        # Worker processes ([proxy] workers) hold their own copy of the config:
        # replace them one by one so every process serves the new one.
        workers = _named_child(service, "workers")
        if workers is not None:
            workers.restart_workers()
    else:
        log.error("configuration reloaded, but: {errors}", errors="; ".join(errors))
    return dict(service.last_reload)


def _named_child(service, name):
    try:
        return service.getServiceNamed(name)
    except KeyError:
        return None


def _summary(changes: dict) -> str:
    return ", ".join(f"{k} {', '.join(v)}" for k, v in changes.items() if v) or "no listener or backend changes"


def apply(service, runtime, settings) -> dict:
    """Swap *runtime* in for the service's current one (synchronously: no request
    runs in between), returning what changed."""
    old = service.runtime
    changes: dict[str, list] = {
        "backends_kept": [], "backends_rebuilt": [], "networks_rebound": [], "networks_added": [],
        "networks_removed": [], "listeners_restarted": [], "_started": []}

    # Backends: keep unchanged ones (pools, health, circuits); rebuild the rest.
    replace = {}
    retired = []
    for name, new in list(runtime.backends.items()):
        prev = old.backends.get(name)
        if prev is None:
            continue
        if _component_key(old.config, old.config.backends[name]) == _component_key(runtime.config,
                                                                                    runtime.config.backends[name]):
            replace[id(new)] = prev
            runtime.backends[name] = prev
            changes["backends_kept"].append(name)
            if hasattr(new, "close"):
                new.close()  # built for validation only, never used
        else:
            changes["backends_rebuilt"].append(name)
            new_pool, old_pool = getattr(new, "target_pool", None), getattr(prev, "target_pool", None)
            if new_pool is not None and old_pool is not None:
                new_pool.adopt_state(old_pool)
            retired.append(prev)
    retired += [b for n, b in old.backends.items() if n not in runtime.backends]
    for pipeline in runtime.pipelines.values():
        pipeline.backends = [replace.get(id(b), b) for b in pipeline.backends]

    # Self-listening endpoints: keep unchanged ones (open associations), restart the rest.
    old_listeners = {ep.name: ep for ep, _ in old.listeners()}
    for endpoint, pipeline in runtime.listeners():
        prev = old_listeners.pop(endpoint.name, None)
        same = prev is not None and (_component_key(old.config, old.config.endpoints[endpoint.name])
                                     == _component_key(runtime.config, runtime.config.endpoints[endpoint.name]))
        if same:
            prev.pipeline = pipeline
            runtime.endpoints[endpoint.name] = prev
            continue
        if prev is not None and isinstance(prev, Service) and prev.parent is not None:
            prev.disownServiceParent()
        endpoint.pipeline = pipeline
        if isinstance(endpoint, Service):
            endpoint.setServiceParent(service)
            if getattr(endpoint, "listening", None) is not None:
                changes["_started"].append(endpoint)
        changes["listeners_restarted"].append(endpoint.name)
    for prev in old_listeners.values():
        if isinstance(prev, Service) and prev.parent is not None:
            prev.disownServiceParent()
        changes["listeners_restarted"].append(prev.name)

    service.metrics.instrument(runtime)
    service.runtime = runtime
    set_level(runtime.config.proxy.log_level)
    if service.set_management(settings) and service.running:
        changes["_started"].append(service.management)

    # Networks: swap routes in place where the listener is unchanged.
    wanted = {n: net.listen for n, net in runtime.config.networks.items() if net.listen}
    for name in list(service.networks):
        svc = service.networks[name]
        if wanted.get(name) == svc.description:
            svc.router.routes = service.routes_for(name, runtime)  # one assignment: atomic for requests
            from harmony.web.network import network_http_table
            svc.site.apply_settings(network_http_table(runtime, name))  # slow-client bounds, for new requests
            continue
        service.networks.pop(name)
        svc.disownServiceParent()  # stops listening; open connections finish their requests
        if name in wanted:
            changes["networks_rebound"].append(name)
        else:
            changes["networks_removed"].append(name)
    for name, listen in wanted.items():
        if name not in service.networks:
            if name not in changes["networks_rebound"]:
                changes["networks_added"].append(name)
            changes["_started"].append(service.add_network(name, listen, runtime))

    # Start health checks of new pools; stop the retired ones' and close them later.
    kept = {id(b) for b in runtime.backends.values()}
    # Background services (store_forward's delivery) of retired backends stop
    # before those of their replacements start, so two never drain one queue.
    for backend in retired:
        if id(backend) not in kept:
            service.release_backend_service(backend)
    for backend in runtime.backends.values():
        service.adopt_backend_service(backend)
        pool = getattr(backend, "target_pool", None)
        if pool is not None and service.running:
            pool.start()
    for backend in retired:
        if id(backend) in kept:
            continue
        pool = getattr(backend, "target_pool", None)
        if pool is not None:
            pool.stop()
        if hasattr(backend, "close"):
            service.retired_backends[backend] = service.reactor.callLater(RETIRE_SECS, _close_retired, service,
                                                                          backend)
    return changes


def _close_retired(service, backend):
    if service.retired_backends.pop(backend, None) is not None:
        backend.close()
