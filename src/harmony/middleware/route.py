"""``route`` middleware: choose the backend for a request by rules.

The pipeline sends a request to ``metadata["backend"]`` when it names one of
its backends (see :meth:`harmony.pipeline.Pipeline.select_backend`); this
middleware sets it from the first matching rule (see :mod:`harmony.routing`)::

    [middleware.by_modality]
    type = "route"
    [[middleware.by_modality.options.rules]]
    metadata = { calling_aet = "CT_.*" }
    backend = "ct_archive"

A request no rule matches goes to ``default`` when set, else the pipeline's first backend.
"""

from __future__ import annotations

from harmony.config.errors import OptionError
from harmony.middleware.base import Middleware
from harmony.routing import first_match, parse_rules


class RouteMiddleware(Middleware):
    def __init__(self, name, rules, default=None):
        super().__init__(name)
        self.rules = rules
        self.default = default

    @classmethod
    def from_config(cls, name, options, ctx):
        rules = parse_rules(options.list("rules", of=dict), "rules", "backend")
        known = set(ctx.config.backends)
        for rule in rules:
            if not isinstance(rule.choice, str) or rule.choice not in known:
                raise OptionError(f"rules[{rule.index}].backend",
                                  f"must name a backend, got {rule.choice!r} (known: {', '.join(sorted(known))})")
        default = options.str("default", None)
        if default is not None and default not in known:
            raise OptionError("default", f"names unknown backend {default!r}")
        return cls(name, rules, default)

    def on_request(self, request):
        rule = first_match(self.rules, request)
        chosen = rule.choice if rule is not None else self.default
        if chosen:
            request.metadata["backend"] = chosen
        return request
