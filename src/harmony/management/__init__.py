"""Operations: the management API, Prometheus metrics and hot reload.

See docs/management.md, docs/metrics.md and docs/reload.md.
"""
