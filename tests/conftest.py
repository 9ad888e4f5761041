"""Shared, session-scoped fixtures live in the fixture modules below, one per area,
so that each is started once per test session (a vLLM server, a Ray cluster, a tiny
trained generator)."""

pytest_plugins = [
    "tests.fixtures_generator",
    "tests.fixtures_serving",
    "tests.fixtures_ray",
]
