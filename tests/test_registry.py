"""harmony.registry: every built-in type name resolves to a class, lazily; custom types register."""

from __future__ import annotations

import pytest

from harmony.registry import BACKEND, BUILTIN, ENDPOINT, MIDDLEWARE, Registry, UnknownType, load_object


@pytest.mark.parametrize("kind, name", [(k, n) for k, types in BUILTIN.items() for n in types])
def test_every_builtin_resolves(kind, name):
    cls = Registry().lookup(kind, name)
    assert isinstance(cls, type) and hasattr(cls, "from_config")


def test_an_unknown_type_lists_the_known_ones():
    with pytest.raises(UnknownType) as e:
        Registry().lookup(BACKEND, "carrier_pigeon")
    assert "unknown backend type 'carrier_pigeon'" in str(e.value) and "dicom_scu" in str(e.value)


def test_custom_types_register_by_class_or_spec():
    registry = Registry()
    registry.register(MIDDLEWARE, "mine", "harmony.middleware.passthru:Passthru")
    registry.register(ENDPOINT, "direct", dict)
    assert registry.has(MIDDLEWARE, "mine") and "mine" in registry.names(MIDDLEWARE)
    assert registry.lookup(MIDDLEWARE, "mine").__name__ == "Passthru"
    assert registry.lookup(ENDPOINT, "direct") is dict
    assert not Registry().has(MIDDLEWARE, "mine")  # one registry per configuration


def test_load_object_forms_and_errors():
    assert load_object("harmony.registry.Registry") is Registry
    with pytest.raises(ValueError, match="package.module:Class"):
        load_object("nodots")
    with pytest.raises(ValueError, match="has no attribute"):
        load_object("harmony.registry:Nothing")
    with pytest.raises(ImportError):
        load_object("harmony.no_such_module:X")
