"""Which FHIR RESTful interaction a request is (FHIR http.html), and whether
its body is fit to send upstream.

Classifying every request lets middleware decide by interaction and resource
type (``metadata['fhir.interaction']``, ``['fhir.resource_type']``) instead of
by regex on paths, and lets the endpoint refuse what no FHIR server could
serve before it goes anywhere.  Path segments are checked against FHIR's own
syntax for types, ids and operation names, which also keeps ``..`` and
percent-encoded tricks from ever reaching an upstream URL.
"""

from __future__ import annotations

import re
import xml.parsers.expat

import attr

from harmony import jsonutil
from harmony.errors import BadRequest, MethodNotAllowed, NotFound
from harmony.fhir.outcome import with_issue

TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
OPERATION = re.compile(r"^\$[A-Za-z][A-Za-z0-9_\-.]{0,63}$")
WELL_KNOWN = re.compile(r"^[a-z0-9][a-z0-9\-_]{0,63}$")
FHIR_NS = "http://hl7.org/fhir"

READ = ("GET", "HEAD")
QUERY = ("GET", "HEAD", "POST")  # searches and operations may POST
#: Interactions whose body is a resource the endpoint checks before sending it on.
RESOURCE_BODY = frozenset({"create", "update", "conditional-update", "batch-transaction"})


@attr.s(auto_attribs=True, frozen=True)
class Interaction:
    name: str
    resource_type: str = ""
    id: str = ""
    version_id: str = ""
    operation: str = ""

    def metadata(self) -> dict[str, str]:
        out = {"fhir.interaction": self.name}
        for key, value in (("resource_type", self.resource_type), ("id", self.id),
                           ("version_id", self.version_id), ("operation", self.operation)):
            if value:
                out["fhir." + key] = value
        return out


def _valid_id(seg: str) -> bool:
    return bool(ID.match(seg)) and seg not in (".", "..")


def _by_method(method: str, table: dict, **fields) -> Interaction:
    for methods, name in table.items():
        if method in methods:
            return Interaction(name, **fields)
    allowed = sorted({m for methods in table for m in methods})
    raise MethodNotAllowed(f"{method} is not a FHIR interaction on this URL (allowed: {', '.join(allowed)})",
                           headers=[("Allow", ", ".join(allowed))])


def classify(method: str, subpath: str, has_query: bool = False) -> Interaction:
    """The interaction *method* on *subpath* (below the FHIR base) names.

    Raises NotFound for a path that is no FHIR URL and MethodNotAllowed for a
    method the URL does not take.
    """
    segs = [s for s in subpath.split("/") if s]
    n = len(segs)
    if n == 0:
        return _by_method(method, {READ: "search-system" if has_query else "base",
                                   ("POST",): "batch-transaction"})
    first = segs[0]
    if n == 1 and first == "metadata":
        return _by_method(method, {READ: "capabilities"})
    if n == 1 and first == "_history":
        return _by_method(method, {READ: "history-system"})
    if n == 1 and first == "_search":
        return _by_method(method, {QUERY: "search-system"})
    if first == ".well-known" and n == 2 and WELL_KNOWN.match(segs[1]):
        # SMART on FHIR discovery (smart-configuration) lives under the FHIR base.
        return _by_method(method, {READ: "well-known"})
    if OPERATION.match(first) and n == 1:
        return _by_method(method, {QUERY: "operation"}, operation=first[1:])
    if not TYPE.match(first):
        raise with_issue(NotFound(f"'{first}' is not a FHIR resource type, operation or system path"),
                         "not-supported")
    rt = first
    if n == 1:
        return _by_method(method, {READ: "search-type", ("POST",): "create", ("PUT",): "conditional-update",
                                   ("PATCH",): "conditional-patch", ("DELETE",): "conditional-delete"},
                          resource_type=rt)
    second = segs[1]
    if n == 2 and second == "_search":
        return _by_method(method, {QUERY: "search-type"}, resource_type=rt)
    if n == 2 and second == "_history":
        return _by_method(method, {READ: "history-type"}, resource_type=rt)
    if n == 2 and OPERATION.match(second):
        return _by_method(method, {QUERY: "operation"}, resource_type=rt, operation=second[1:])
    if not _valid_id(second):
        raise with_issue(NotFound(f"'{second}' is not a valid FHIR id for {rt}"), "not-found")
    rid = second
    if n == 2:
        return _by_method(method, {READ: "read", ("PUT",): "update", ("PATCH",): "patch", ("DELETE",): "delete"},
                          resource_type=rt, id=rid)
    third = segs[2]
    if n == 3 and third == "_history":
        return _by_method(method, {READ: "history-instance"}, resource_type=rt, id=rid)
    if n == 3 and OPERATION.match(third):
        return _by_method(method, {QUERY: "operation"}, resource_type=rt, id=rid, operation=third[1:])
    if n == 3 and (TYPE.match(third) or third == "*"):
        return _by_method(method, {READ: "search-compartment"}, resource_type=rt, id=rid)
    if third == "_history" and n in (4, 5) and _valid_id(segs[3]):
        if n == 4:
            return _by_method(method, {READ: "vread"}, resource_type=rt, id=rid, version_id=segs[3])
        if OPERATION.match(segs[4]):
            return _by_method(method, {QUERY: "operation"}, resource_type=rt, id=rid, version_id=segs[3],
                              operation=segs[4][1:])
    raise with_issue(NotFound(f"{subpath!r} is not a FHIR REST URL"), "not-supported")


# --------------------------------------------------------------------------- bodies


def _invalid(detail: str, issue: str = "invalid"):
    return with_issue(BadRequest(detail), issue)


def parse_json_resource(body: bytes) -> dict:
    try:
        doc = jsonutil.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise _invalid(f"body is not valid JSON: {e}", "structure") from None
    if not isinstance(doc, dict):
        raise _invalid("body is not a FHIR resource (a JSON object)", "structure")
    rt = doc.get("resourceType")
    if not isinstance(rt, str) or not TYPE.match(rt):
        raise _invalid("body has no resourceType", "required")
    return doc


class _XmlRoot:
    """Root element name, namespace and top-level ``<id value>`` of a FHIR XML
    resource, read with expat and no DTD or entity processing (no XXE, no
    entity expansion bombs)."""

    def __init__(self, body: bytes):
        self.root: tuple[str, str] | None = None
        self.id: str | None = None
        self.depth = 0
        p = xml.parsers.expat.ParserCreate(namespace_separator=" ")
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.StartDoctypeDeclHandler = self._refuse
        p.EntityDeclHandler = self._refuse
        try:
            p.Parse(body, True)
        except xml.parsers.expat.ExpatError as e:
            raise _invalid(f"body is not well-formed XML: {e}", "structure") from None

    def _refuse(self, *args):
        raise _invalid("XML body must not carry a DOCTYPE or entity declarations", "security")

    def _start(self, name, attrs):
        self.depth += 1
        ns, _, local = name.rpartition(" ")
        if self.depth == 1:
            self.root = (ns, local)
        elif self.depth == 2 and local == "id" and ns == FHIR_NS:
            self.id = attrs.get("value")

    def _end(self, name):
        self.depth -= 1


def check_resource_body(interaction: Interaction, fmt: str, body: bytes):
    """Refuse a body that cannot be the resource the URL says; returns the
    parsed JSON document (or None for XML) so middleware need not parse again."""
    if not body:
        raise _invalid(f"{interaction.name} needs a resource in the body", "required")
    wanted = "Bundle" if interaction.name == "batch-transaction" else interaction.resource_type
    if fmt == "json":
        doc = parse_json_resource(body)
        rt, rid = doc["resourceType"], doc.get("id")
    else:
        root = _XmlRoot(body)
        ns, rt = root.root
        if ns != FHIR_NS:
            raise _invalid(f"XML root element is not in the FHIR namespace {FHIR_NS}", "structure")
        rid, doc = root.id, None
    if rt != wanted:
        raise _invalid(f"body is a {rt} but the URL is for {wanted}", "invalid")
    if interaction.name == "update" and rid != interaction.id:
        raise _invalid(f"resource id {rid!r} in the body does not match id {interaction.id!r} in the URL "
                       "(FHIR requires them to agree on update)", "invalid")
    if interaction.name == "batch-transaction" and doc is not None \
            and doc.get("type") not in ("batch", "transaction"):
        raise _invalid(f"a Bundle posted to the base must be a batch or transaction, not {doc.get('type')!r}")
    return doc
