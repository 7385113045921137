"""Benchmarks for the securechat server (issue 5): ``python -m benchmarks [scenario ...]``.

A real server process on loopback, driven over TLS with wire protocol v1 by
load-generator processes; see docs/performance.md.
"""
