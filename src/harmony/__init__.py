"""Harmony: a multi-protocol healthcare proxy on Twisted.

Protocol request -> Endpoint -> RequestEnvelope -> Pipeline
(middleware left -> backend -> middleware right) -> ResponseEnvelope -> protocol response.
"""

__version__ = "0.1.0"
