"""``metadata_transform``: a JOLT chain over the envelope's metadata map.

Used to derive routing keys or protocol hints from what earlier steps found,
e.g. set ``dimse_op`` from the path, or ``backend`` from a JWT claim::

    [middleware.route_by_tenant]
    type = "metadata_transform"
    spec_path = "tenant_route.json"
    apply = "left"

The input is the metadata map as it is (flat keys such as ``auth.sub``); a
shift output like ``{"route": {"key": "x"}}`` comes back as ``route.key``
(JOLT's RHS dots nest, metadata keys are flat).  Only string outputs are
written back; other values are ignored, and keys the output does not mention
are kept, so a spec cannot silently drop ``request_id``.
"""

from __future__ import annotations

from harmony.errors import MiddlewareFailed
from harmony.log import get_logger
from harmony.middleware.transform import SpecMiddleware
from harmony.transform import TransformFailed

log = get_logger("harmony.middleware.metadata_transform")


def flatten(document, prefix="") -> dict:
    """Nested objects -> dotted keys; only string leaves survive."""
    out: dict[str, str] = {}
    if not isinstance(document, dict):
        return out
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, str):
            out[name] = value
    return out


class MetadataTransform(SpecMiddleware):
    default_apply = "left"

    def __init__(self, name, spec, *, on_request=True, on_response=False, fail_on_error=True):
        super().__init__(name, spec, on_request=on_request, on_response=on_response, fail_on_error=fail_on_error)

    def _apply(self, metadata: dict):
        try:
            output = self.spec.apply(dict(metadata))
        except TransformFailed as e:
            # The engine's message may quote the document (patient data): debug only.
            log.warn("metadata_transform {name} failed on a document (details at debug level)", name=self.name)
            log.debug("metadata_transform {name} failure: {error}", name=self.name, error=str(e))
            if self.fail_on_error:
                raise MiddlewareFailed(f"metadata transform {self.name!r} failed") from None
            return
        metadata.update(flatten(output))

    def on_request(self, request):
        if self.requests:
            self._apply(request.metadata)
        return request

    def on_response(self, request, response):
        if self.responses:
            self._apply(response.metadata)
        return response
