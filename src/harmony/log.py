"""Structured logging on twisted.logger, with Harmony's own level filter.

twistd owns the global observers, so ``[proxy] log_level`` cannot filter them;
instead every Harmony logger publishes through one filtering observer, whose
level the configuration sets.  Twisted's own events pass untouched.
"""

from __future__ import annotations

import io
import sys
import warnings

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)

_LEVELS = {"trace": LogLevel.debug, "debug": LogLevel.debug, "info": LogLevel.info,
           "warn": LogLevel.warn, "warning": LogLevel.warn, "error": LogLevel.error,
           "critical": LogLevel.critical}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


def _publish(event):
    globalLogPublisher(event)


_filtered = FilteringLogObserver(_publish, [_predicate])  # type: ignore[arg-type,list-item]  # zope interfaces


def get_logger(namespace: str) -> Logger:
    return Logger(namespace=namespace, observer=_filtered)  # type: ignore[arg-type]  # zope interface


def enabled(namespace: str, level: str) -> bool:
    """Whether an event at *level* in *namespace* would pass the level filter
    (lets a hot path skip building an event nobody will see).  Answered from a
    cache that :func:`set_level` empties: the access log asks once a request, and
    the filter's own lookup walks the namespace's parents each time."""
    key = (namespace, level)
    answer = _enabled.get(key)
    if answer is None:
        answer = _enabled[key] = _LEVELS[level] >= _predicate.logLevelForNamespace(namespace)
    return answer


#: enabled()'s answers since the level was last set.
_enabled: dict[tuple[str, str], bool] = {}


#: pydicom warnings that quote an element's value ("Invalid value for VR DA:
#: '19700101X'."): a query's PatientBirthDate or PatientName would reach the log.
_VALUE_WARNINGS = {"message": r"Invalid value for VR", "module": r"pydicom(\.|$)"}


def set_level(level: str) -> None:
    chosen = _LEVELS.get(level.lower(), LogLevel.info)
    _predicate.setLogLevelForNamespace("", chosen)
    _enabled.clear()
    # twistd logs Python warnings at warn whatever our level, so PHI-quoting ones
    # are dropped unless the operator asked for debug (where PHI may appear).
    warnings.filterwarnings("ignore", message=_VALUE_WARNINGS["message"], module=_VALUE_WARNINGS["module"])
    if chosen <= LogLevel.debug:
        warnings.filters[:] = [f for f in warnings.filters if not _is_value_filter(f)]  # type: ignore[index]


def _is_value_filter(f) -> bool:
    action, message, _category, module, _lineno = f
    return (action == "ignore" and getattr(message, "pattern", None) == _VALUE_WARNINGS["message"]
            and getattr(module, "pattern", None) == _VALUE_WARNINGS["module"])


def file_observer(path: str, fmt: str = "text"):
    """An observer writing to *path* (``-`` for stdout), as text or JSON lines."""
    if path == "-":
        stream = sys.stdout
    else:
        stream = io.open(path, "a", encoding="utf-8")
    if fmt == "json":
        # No record separator: one JSON object per line ("JSON lines"), which
        # jq, Loki, Vector and friends read as is.
        return jsonFileLogObserver(stream, recordSeparator=""), stream
    return textFileLogObserver(stream), stream


#: What this process's stdout log looks like ("text" or "json"); worker
#: processes are told, so their lines match the main process's.
stdout_format = "text"


def json_stdout_observer():
    """JSON lines on stdout in place of twistd's text log:
    ``twistd -n --logger=harmony.log.json_stdout_observer harmony -c ...``."""
    global stdout_format
    stdout_format = "json"
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
