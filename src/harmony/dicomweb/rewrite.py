"""Rewriting upstream absolute URLs into this proxy's own.

A DICOMweb server puts its own address into RetrieveURL (UR values),
BulkDataURI, Location and Content-Location; behind a proxy those must name the
proxy, or the client would bypass it (and its auth) on the next request.
"""

from __future__ import annotations

from urllib.parse import urlsplit


class UrlRewriter:
    """Maps URLs under ``upstream_base`` (any host: servers often build them
    from the Host they were sent) to the same resource under ``public_base``."""

    def __init__(self, upstream_base: str, public_base: str):
        self.base_path = urlsplit(upstream_base).path.rstrip("/")
        self.public_base = public_base.rstrip("/")

    def url(self, value: str) -> str:
        if not isinstance(value, str):
            return value
        parts = urlsplit(value)
        if parts.scheme and parts.scheme not in ("http", "https"):
            return value
        path = parts.path
        if self.base_path and not (path == self.base_path or path.startswith(self.base_path + "/")):
            return value
        rest = path[len(self.base_path):]
        out = self.public_base + rest
        if parts.query:
            out += "?" + parts.query
        return out

    def dicom_json(self, doc):
        """Rewrite UR values and BulkDataURIs anywhere in a DICOM JSON document."""
        if isinstance(doc, list):
            for item in doc:
                self.dicom_json(item)
        elif isinstance(doc, dict):
            for attr in doc.values():
                if not isinstance(attr, dict):
                    continue
                if "BulkDataURI" in attr:
                    attr["BulkDataURI"] = self.url(attr["BulkDataURI"])
                values = attr.get("Value")
                if not isinstance(values, list):
                    continue
                if attr.get("vr") == "UR":
                    attr["Value"] = [self.url(v) for v in values]
                elif attr.get("vr") == "SQ":
                    self.dicom_json(values)
        return doc
