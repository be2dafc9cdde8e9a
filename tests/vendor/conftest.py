"""Vendored third-party suites are run by their own harness tests (tests/test_*_upstream.py and the like),
in a subprocess with their own fixtures; the main pytest run must not collect them directly."""

collect_ignore_glob = ["*"]
