"""Helpers shared by the test suites (fixtures, environment checks)."""
