"""The `shipyard` command: runs the server and talks to a running one over its HTTP API.

Prints one clear line per error (no traceback) and exits 1; never imports server internals to read state.
"""
