"""mediahub: an iconik-like media asset platform built as small services on Shipyard (see ../README.md).

Each module is one service or worker, run by the platform from ../shipyard.yaml; nothing here runs at import.
"""
