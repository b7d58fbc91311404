"""Helpers for tests and benchmarks only (a real local S3 server, a fault-injecting proxy, a Label
Studio harness, ...): a top-level folder of the repository, not part of the installed package."""
