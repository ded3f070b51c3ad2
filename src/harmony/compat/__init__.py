"""Every reach into a dependency's private API, in one module per dependency.

Why: Twisted, pynetdicom and pydicom give no stability promise for names that start
with an underscore.  Gathering them here means an upgrade breaks in one place, with
one test per reach-in (tests/compat/) saying exactly which private name moved, instead
of somewhere deep in a request path.  Code elsewhere imports the public-looking names
from here and never writes ``._name`` on a dependency's object.
"""
