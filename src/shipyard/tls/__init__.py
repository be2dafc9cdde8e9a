"""TLS for Shipyard: a Consul-style certificate authority (`shipyard tls`), and the SSL contexts of its listeners
and clients.

Pure: it makes certificates and contexts; it never listens, connects or reads a setting it was not handed.
"""

from shipyard.tls.authority import (
           CA_FILE,
           CA_KEY_FILE,
           CertificateError,
           CertRequest,
           create_ca_files,
           create_cert_files,
           self_signed,
)
from shipyard.tls.contexts import ClientTls, TlsConfigError, client_context, server_context

__all__ = ["CA_FILE", "CA_KEY_FILE", "CertRequest", "CertificateError", "ClientTls", "TlsConfigError",
           "client_context", "create_ca_files", "create_cert_files", "self_signed", "server_context"]
