"""FHIR REST knowledge shared by the ``fhir`` endpoint and backend: the
interaction a URL names (:mod:`.rest`), media types and ``_format``
(:mod:`.formats`), OperationOutcome bodies (:mod:`.outcome`) and rewriting of
the upstream's absolute URLs (:mod:`.rewrite`)."""
