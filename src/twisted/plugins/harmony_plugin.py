"""twistd plugin: ``twistd -n harmony -c harmony.toml``.

Imports stay inside functions: an import error at module level would only show
up as twistd's unhelpful "Unknown command: harmony".
"""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [["config", "c", "/etc/harmony/harmony.toml", "Path to the Harmony TOML configuration."],
                     ["state-dir", None, None, "Where state lives (the store, generated secrets); default: "
                                               "$STATE_DIRECTORY (systemd StateDirectory=), then [proxy] state_dir."]]


@implementer(IServiceMaker, IPlugin)
class HarmonyServiceMaker:
    tapname = "harmony"
    description = "Harmony multi-protocol healthcare proxy (HTTP, FHIR, DICOMweb, DIMSE, JMIX)."
    options = Options

    def makeService(self, options):
        import sys

        from harmony.config import ConfigErrors
        from harmony.service import make_service

        if options["state-dir"]:
            import os
            # The same as systemd's variable, so worker processes and reloads see it too.
            os.environ["STATE_DIRECTORY"] = os.path.abspath(options["state-dir"])
        try:
            return make_service(options["config"])
        except ConfigErrors as e:
            # Refuse to start; nothing has listened yet.
            sys.stderr.write(f"harmony: not starting, {e.render()}\n")
            raise SystemExit(1)


serviceMaker = HarmonyServiceMaker()
