"""A one-route echo server for the routing benchmark, on bare twisted.web or on Klein.

    python echo_server.py bare|klein PORT

Both answer ``GET /echo/<word>`` with the word and 404 anything else, through
the same reactor, Site and logging (none): the difference is the routing
layer (a Resource's getChild vs Klein's werkzeug URL map and its Deferred
plumbing), which is what decides where Klein belongs in Harmony.
"""

import sys

from twisted.internet import reactor
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Site


class Echo(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return request.postpath[0] if request.postpath else b""


class Root(Resource):
    def getChild(self, name, request):
        if name == b"echo":
            return Echo()
        return NoResource()


def klein_resource():
    from klein import Klein

    app = Klein()

    @app.route("/echo/<word>", methods=["GET"])
    def echo(request, word):
        request.setHeader(b"content-type", b"text/plain")
        return word.encode()

    return app.resource()


def main():
    kind, port = sys.argv[1], int(sys.argv[2])
    root = Root() if kind == "bare" else klein_resource()
    site = Site(root)
    site.log = lambda request: None  # no access log in either
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main()
