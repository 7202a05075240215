"""Test support shipped with the package (the pytest plugin that provides Postgres/Redis)."""
