"""The Vault-compatible secrets engine: barrier, tokens, policies, KV and transit engines, audit.

It may import only the store (and shared errors); HTTP shapes live in shipyard.api.vault.
"""
