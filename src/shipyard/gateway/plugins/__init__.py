"""Gateway plugins, one module each; importing this package registers every plugin in PLUGINS.

Nothing here runs at import time beyond registration.
"""

from shipyard.gateway.plugins.base import PLUGINS, Consumer, Plugin, PluginConfigError, Reject, RequestContext

__all__ = ["PLUGINS", "Consumer", "Plugin", "PluginConfigError", "Reject", "RequestContext"]
