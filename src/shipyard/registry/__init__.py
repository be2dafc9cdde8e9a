"""The registry: catalog of nodes, services and checks, the health checker, Consul KV and sessions.

All state lives in the store under catalog/, kv/ and sessions/; nothing here speaks HTTP.
"""
