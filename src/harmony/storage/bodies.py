"""A stored file as a request body, opened only when a client starts sending it."""

from __future__ import annotations

from pathlib import Path

from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class FileProducer:
    """``IBodyProducer`` over a file, read in chunks by Twisted's cooperator.

    The file is opened in ``startProducing`` and closed when production ends,
    so an envelope whose body nobody reads holds no file descriptor.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.length = self.path.stat().st_size
        self._inner = None

    def startProducing(self, consumer):
        fh = open(self.path, "rb")
        self._inner = FileBodyProducer(fh)
        d = self._inner.startProducing(consumer)

        def close(result):
            fh.close()
            return result

        return d.addBoth(close)

    def pauseProducing(self):
        if self._inner is not None:
            self._inner.pauseProducing()

    def resumeProducing(self):
        if self._inner is not None:
            self._inner.resumeProducing()

    def stopProducing(self):
        if self._inner is not None:
            self._inner.stopProducing()


__all__ = ["FileProducer"]
