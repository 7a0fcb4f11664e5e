"""Tooling shared by tests/ and bench/: real processes (redis-server, the make run stack) on free ports,
stopped by process group. The product never imports it."""
