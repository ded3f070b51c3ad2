"""The management API's own listener (when not mounted on a network)."""

from __future__ import annotations

from harmony.management.api import AdminApi, AdminResource
from harmony.web.network import NetworkService


class ManagementService(NetworkService):
    """A NetworkService whose site serves only the management API."""

    def __init__(self, harmony_service, description: str, reactor):
        super().__init__("management", description, AdminResource(AdminApi(harmony_service)), reactor)
        self.setName("management")
