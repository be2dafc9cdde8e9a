"""Gateway plugins, one module each; importing this package registers every plugin in PLUGINS.

Nothing here runs at import time beyond registration.
"""

from shipyard.gateway.plugins import (  # noqa: F401  (each import registers its plugin)
    acl,
    basic_auth,
    correlation_id,
    cors,
    ip_restriction,
    jwt_auth,
    key_auth,
    prometheus,
    rate_limiting,
    request_size_limiting,
    request_transformer,
    response_transformer,
)
from shipyard.gateway.plugins.base import PLUGINS, Consumer, Plugin, PluginConfigError, Reject, RequestContext

__all__ = ["PLUGINS", "Consumer", "Plugin", "PluginConfigError", "Reject", "RequestContext"]
