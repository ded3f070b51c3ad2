"""Type registry: maps the names used in TOML to implementing classes.

Adding a type is one new module plus one line in the table below.  Classes are
imported lazily, so a config that never uses DIMSE never imports pynetdicom, and
an optional dependency's absence only matters to configs that need it.
"""

from __future__ import annotations

import importlib

ENDPOINT, BACKEND, MIDDLEWARE = "endpoint", "backend", "middleware"

#: kind -> type name -> "module:attribute"
BUILTIN: dict[str, dict[str, str]] = {
    ENDPOINT: {
        "http": "harmony.endpoints.http:HttpEndpoint",
        "jmix": "harmony.endpoints.jmix:JmixEndpoint",
        "fhir": "harmony.endpoints.fhir:FhirEndpoint",
        "dicomweb": "harmony.endpoints.dicomweb:DicomWebEndpoint",
        "dicom_scp": "harmony.endpoints.dicom_scp:DicomScpEndpoint",
        "dicom": "harmony.endpoints.dicom_scp:DicomScpEndpoint",
        "mllp": "harmony.endpoints.mllp:MllpEndpoint",
    },
    BACKEND: {
        "echo": "harmony.backends.echo:EchoBackend",
        "http": "harmony.backends.http:HttpBackend",
        "dicomweb": "harmony.backends.dicomweb:DicomWebBackend",
        "dicom_scu": "harmony.backends.dicom_scu:DicomScuBackend",
        "dicom": "harmony.backends.dicom_scu:DicomScuBackend",
        "fhir": "harmony.backends.fhir:FhirBackend",
        "local_archive": "harmony.backends.local_archive:LocalArchiveBackend",
        "store_forward": "harmony.backends.store_forward:StoreForwardBackend",
        "mllp": "harmony.backends.mllp:MllpBackend",
    },
    MIDDLEWARE: {
        "passthru": "harmony.middleware.passthru:Passthru",
        "basic_auth": "harmony.middleware.basic_auth:BasicAuth",
        "jwt_auth": "harmony.middleware.jwt_auth:JwtAuth",
        "jwtauth": "harmony.middleware.jwt_auth:JwtAuth",
        "path_filter": "harmony.middleware.path_filter:PathFilter",
        "json_extractor": "harmony.middleware.json_extractor:JsonExtractor",
        "transform": "harmony.middleware.transform:Transform",
        "metadata_transform": "harmony.middleware.metadata_transform:MetadataTransform",
        "jmix_builder": "harmony.middleware.jmix_builder:JmixBuilder",
        "route": "harmony.middleware.route:RouteMiddleware",
        "dicomweb_bridge": "harmony.middleware.dicomweb_bridge:DicomWebBridge",
        "dicomweb": "harmony.middleware.dicomweb_bridge:DicomWebBridge",
        "fhir_cfind": "harmony.middleware.fhir_cfind:FhirCFind",
        "dicom_results_json": "harmony.middleware.dicom_results:DicomResultsJson",
        "deidentify": "harmony.middleware.deidentify:Deidentify",
    },
}


class UnknownType(LookupError):
    pass


def load_object(spec: str):
    """Import ``"package.module:Attribute"`` (or ``"package.module.Attribute"``)."""
    if ":" in spec:
        module_name, _, attr_name = spec.partition(":")
    else:
        module_name, _, attr_name = spec.rpartition(".")
    if not module_name or not attr_name:
        raise ValueError(f"expected 'package.module:Class', got {spec!r}")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr_name)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr_name!r}") from None


class Registry:
    """The types one configuration can use: built-ins plus its custom modules."""

    def __init__(self):
        self._specs = {kind: dict(types) for kind, types in BUILTIN.items()}

    def register(self, kind: str, name: str, spec):
        """Register a class (or an import spec string) under *name*."""
        self._specs.setdefault(kind, {})[name] = spec

    def names(self, kind: str) -> list[str]:
        return sorted(self._specs.get(kind, {}))

    def has(self, kind: str, name: str) -> bool:
        return name in self._specs.get(kind, {})

    def lookup(self, kind: str, name: str):
        try:
            spec = self._specs[kind][name]
        except KeyError:
            known = ", ".join(self.names(kind))
            raise UnknownType(f"unknown {kind} type {name!r} (known: {known})") from None
        if isinstance(spec, str):
            spec = load_object(spec)
            self._specs[kind][name] = spec
        return spec
