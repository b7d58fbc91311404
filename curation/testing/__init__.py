"""Helpers for tests and benchmarks (a real local S3 server); not used by the job."""
