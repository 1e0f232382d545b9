"""Real multi-host runs: hosts in network namespaces (see test_multihost.py)."""
