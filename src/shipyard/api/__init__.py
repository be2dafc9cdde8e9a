"""HTTP edges: the Consul-compatible /v1 API (and later /v2, /api, /ui) over one aiohttp app.

Edges translate HTTP to calls on the registry and store; they hold no state of their own.
"""
