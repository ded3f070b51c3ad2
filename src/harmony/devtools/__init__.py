"""Tools for working on Harmony itself (not used by the running proxy).

They read the source with :mod:`ast` and import nothing from Harmony, so they run on a
broken tree too, and they are the same code the suite runs to keep the layering true.
"""
