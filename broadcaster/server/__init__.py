"""`broadcaster serve`: the HTTP app, the live public side and the in-process dispatcher."""

from broadcaster.server.app import GracefulServer, create_app, server_config

__all__ = ["GracefulServer", "create_app", "server_config"]
