"""Turn a loaded configuration into live objects, or a list of every problem.

Building *is* validating: every endpoint, backend and middleware is constructed
from its options (which is where types check them), every pipeline reference is
resolved and every HTTP route is placed, all before anything listens.
"""

from __future__ import annotations

from pathlib import Path

import attr
from zope.interface.verify import verifyObject

from harmony.config.errors import ConfigErrors, OptionError, Problem, unknown_key_problems
from harmony.config.model import ComponentConfig, HarmonyConfig
from harmony.config.options import Options
from harmony.interfaces import IBackend, IEndpoint, IHttpEndpoint, IMiddleware
from harmony.pipeline import Pipeline
from harmony.registry import BACKEND, ENDPOINT, MIDDLEWARE, Registry, UnknownType, load_object


@attr.s(auto_attribs=True)
class Route:
    network: str
    prefix: str
    endpoint: object
    pipeline: Pipeline

    @property
    def segments(self) -> tuple:
        return split_path(self.prefix)


def normalise_prefix(prefix: str) -> str:
    return "/" + "/".join(split_path(prefix))


def split_path(path: str) -> tuple:
    return tuple(s for s in path.split("/") if s)


@attr.s(auto_attribs=True)
class BuildContext:
    """What a type's ``from_config`` may consult besides its own options."""

    config: HarmonyConfig
    reactor: object
    registry: Registry
    component: ComponentConfig | None = None

    @property
    def base_dir(self) -> Path:
        return self.config.base_dir

    @property
    def storage_path(self) -> Path:
        return self.config.storage_path

    @property
    def transforms_path(self) -> Path:
        return self.config.proxy.transforms_path or self.config.base_dir

    def targets(self) -> list[dict]:
        """The ``[targets.*]`` tables this backend names, in order."""
        if self.component is None:
            return []
        found = []
        for name in self.component.targets:
            t = self.config.targets.get(name)
            if t is None:
                raise OptionError("targets", f"names unknown target {name!r}")
            found.append({"name": name, **{k: v for k, v in t.items() if k != "_source"}})
        return found


@attr.s(auto_attribs=True)
class Runtime:
    config: HarmonyConfig
    registry: Registry
    endpoints: dict
    backends: dict
    middleware: dict
    pipelines: dict
    #: network name -> list of Route, longest prefix first
    routes: dict
    warnings: list = attr.Factory(list)

    def endpoint_pipeline(self, endpoint_name: str):
        for p in self.config.pipelines.values():
            if endpoint_name in p.endpoints:
                return self.pipelines[p.name]
        return None

    def listeners(self) -> list:
        """Endpoints that listen on their own (DIMSE), with their pipeline."""
        out = []
        for name, ep in self.endpoints.items():
            if getattr(ep, "transport", "http") != "http":
                pipe = self.endpoint_pipeline(name)
                if pipe is not None:
                    out.append((ep, pipe))
        return out


def _registry_for(config: HarmonyConfig, problems: list) -> Registry:
    reg = Registry()
    for name, info in config.custom_types.items():
        try:
            cls = load_object(info["module"])
        except Exception as e:  # noqa: BLE001 - any import failure is a config problem
            problems.append(Problem(info["source"], f"{info['table']}.module",
                                    f"cannot load {info['module']!r}: {e}"))
            continue
        kinds = [info["kind"]] if info["kind"] else []
        if not kinds:
            if IEndpoint.implementedBy(cls):
                kinds.append(ENDPOINT)
            if IBackend.implementedBy(cls):
                kinds.append(BACKEND)
            if IMiddleware.implementedBy(cls):
                kinds.append(MIDDLEWARE)
        if not kinds:
            problems.append(Problem(info["source"], f"{info['table']}.module",
                                    f"{info['module']!r} implements none of IEndpoint, IBackend, IMiddleware"))
        for kind in kinds:
            reg.register(kind, name, cls)
    return reg


def _build(kind, iface, comp: ComponentConfig, ctx: BuildContext, problems, warnings):
    try:
        cls = ctx.registry.lookup(kind, comp.type)
    except UnknownType as e:
        key = f"{comp.table}.type" if "type" in comp.raw else f"{comp.table}.service"
        problems.append(Problem(comp.source, key, str(e)))
        return None
    except Exception as e:  # noqa: BLE001 - an import error in a type module
        problems.append(Problem(comp.source, comp.table, f"cannot load type {comp.type!r}: {e}"))
        return None
    options = Options(comp.options, base_dir=Path(comp.source).parent)
    ctx = attr.evolve(ctx, component=comp)
    try:
        obj = cls.from_config(comp.name, options, ctx)
    except OptionError as e:
        problems.append(Problem(comp.source, f"{comp.table}.options.{e.key}", e.message))
        return None
    except ConfigErrors as e:
        problems.extend(e.problems)
        return None
    # The keys the type asked for are the ones it knows: the rest are typos or
    # leftovers, named one by one with the closest known key.
    warnings.extend(unknown_key_problems({k: None for k in options.raw}, options.used, comp.source,
                                         f"{comp.table}.options"))
    if not iface.providedBy(obj):
        problems.append(Problem(comp.source, comp.table, f"type {comp.type!r} is not a {kind}"))
        return None
    verifyObject(iface, obj, tentative=True)
    return obj


def build_runtime(config: HarmonyConfig, reactor=None, *, builtin_middleware_ok: bool = True,
                  problems: list | None = None) -> Runtime:
    """Construct every component and route; raise :class:`ConfigErrors` listing all problems.

    With a *problems* list (``harmony check``), problems are appended to it and
    the runtime is returned as far as it could be built, never raised.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor
        reactor = default_reactor
    collect = problems is not None
    problems = [] if problems is None else problems
    warnings: list[Problem] = list(config.warnings)
    registry = _registry_for(config, problems)
    ctx = BuildContext(config=config, reactor=reactor, registry=registry)

    middleware = {}
    for name, comp in config.middleware.items():
        obj = _build(MIDDLEWARE, IMiddleware, comp, ctx, problems, warnings)
        if obj is not None:
            middleware[name] = obj
    backends = {}
    for name, comp in config.backends.items():
        obj = _build(BACKEND, IBackend, comp, ctx, problems, warnings)
        if obj is not None:
            backends[name] = obj
    for name, obj in backends.items():
        # A backend that delivers through other backends (store_forward) gets
        # them once all are built.
        bind = getattr(obj, "bind_backends", None)
        if bind is not None:
            comp = config.backends[name]
            try:
                bind(backends)
            except OptionError as e:
                problems.append(Problem(comp.source, f"{comp.table}.options.{e.key}", e.message))
    endpoints = {}
    for name, comp in config.endpoints.items():
        obj = _build(ENDPOINT, IEndpoint, comp, ctx, problems, warnings)
        if obj is not None:
            endpoints[name] = obj

    pipelines = {}
    routes: dict[str, list[Route]] = {n: [] for n in config.networks}
    claimed: dict[tuple[str, str], str] = {}
    own_listener: dict[str, str] = {}
    for pname, pc in config.pipelines.items():
        where = f"pipelines.{pname}"
        mws = []
        for mname in pc.middleware:
            if mname in middleware:
                mws.append(middleware[mname])
            elif mname in config.middleware or ("middleware", mname) in config.broken:
                continue  # failed to build; already reported
            elif builtin_middleware_ok and registry.has(MIDDLEWARE, mname):
                # Harmony lets a pipeline name a built-in middleware with no table.
                comp = ComponentConfig(name=mname, type=mname, options={}, source=pc.source,
                                       table=f"middleware.{mname}")
                obj = _build(MIDDLEWARE, IMiddleware, comp, ctx, problems, warnings)
                if obj is not None:
                    middleware[mname] = obj
                    mws.append(obj)
            else:
                problems.append(Problem(pc.source, f"{where}.middleware", f"names unknown middleware {mname!r}"))
        bes = []
        for bname in pc.backends:
            if bname in backends:
                bes.append(backends[bname])
            elif bname not in config.backends and ("backends", bname) not in config.broken:
                problems.append(Problem(pc.source, f"{where}.backends", f"names unknown backend {bname!r}"))
        for nname in pc.networks:
            if nname not in config.networks:
                problems.append(Problem(pc.source, f"{where}.networks", f"names unknown network {nname!r}"))
        if not pc.endpoints:
            warnings.append(Problem(pc.source, where, "has no endpoints, so nothing reaches it"))
        for mw in mws:
            # A middleware whose security checks were explicitly waived (jwt_auth
            # with verify_audience = false) says so, and each pipeline running
            # it is named: `harmony check` prints it, the service logs it.
            for waived in getattr(mw, "waived_checks", ()):
                warnings.append(Problem(pc.source, where, f"runs without checking {waived} "
                                                          f"in middleware {mw.name!r}"))
        pipeline = Pipeline(pname, mws, bes, pc.description)
        pipelines[pname] = pipeline
        for ename in pc.endpoints:
            if ("endpoints", ename) in config.broken:
                continue
            if ename not in config.endpoints:
                problems.append(Problem(pc.source, f"{where}.endpoints", f"names unknown endpoint {ename!r}"))
                continue
            ep = endpoints.get(ename)
            if ep is None:
                continue
            if not IHttpEndpoint.providedBy(ep):
                first = own_listener.get(ename)
                if first:
                    problems.append(Problem(pc.source, f"{where}.endpoints",
                                            f"endpoint {ename!r} listens on its own and is already used by pipeline {first!r}"))
                own_listener[ename] = pname
                continue
            nets = pc.networks or [n for n, net in config.networks.items() if net.listen or not net.valid]
            if not nets:
                problems.append(Problem(pc.source, f"{where}.networks",
                                        f"HTTP endpoint {ename!r} needs a network with [network.NAME.http] or 'listen'"))
            for nname in nets:
                net = config.networks.get(nname)
                if net is None:
                    continue
                if not net.listen and net.valid:
                    problems.append(Problem(pc.source, f"{where}.networks",
                                            f"network {nname!r} has no HTTP listener for endpoint {ename!r}"))
                    continue
                prefix = normalise_prefix(ep.path_prefix)
                owner = claimed.get((nname, prefix))
                if owner is not None:
                    problems.append(Problem(pc.source, f"{where}.endpoints",
                                            f"route conflict on network {nname!r}: prefix {prefix!r} is claimed by "
                                            f"pipeline {owner} and pipeline {pname!r} (endpoint {ename!r})"))
                    continue
                claimed[(nname, prefix)] = f"{pname!r} (endpoint {ename!r})"
                routes[nname].append(Route(nname, prefix, ep, pipeline))
    for rlist in routes.values():
        rlist.sort(key=lambda r: len(r.segments), reverse=True)
    if problems and not collect:
        raise ConfigErrors(problems)
    return Runtime(config=config, registry=registry, endpoints=endpoints, backends=backends,
                   middleware=middleware, pipelines=pipelines, routes=routes, warnings=warnings)


def load_runtime(config_path, reactor=None) -> Runtime:
    """Load and build a configuration; raise :class:`ConfigErrors` with the problems
    of every section at once (a bad port does not hide a missing backend)."""
    from harmony.config.loader import load_config

    problems: list[Problem] = []
    config = load_config(config_path, problems=problems)
    if config is None:
        raise ConfigErrors(problems)
    runtime = build_runtime(config, reactor, problems=problems)
    if problems:
        raise ConfigErrors(problems)
    return runtime
