"""Shared fixtures: one small synthetic world per test session (generated, never committed)."""

import pytest


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from world.synthetic import generate
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, studies=160, seed=0, image_size=128)
    return root
