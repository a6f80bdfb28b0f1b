"""Fixtures shared by the tests: a small prepared synthetic tree, and free loopback ports."""

from __future__ import annotations

import socket

import pytest

from helpers.data import sampling, synthetic


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """Call it for a port: ``port = free_port()`` (a function, so any fixture scope can use it)."""
    return _free_port


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory):
    """``(data_root, images.csv)``: 16 synthetic items (seed 1), every category, no sampling.
    Session-wide and read-only: a test that writes must write under its own tmp_path."""
    root = tmp_path_factory.mktemp("small_tree") / "c2s"
    synthetic.generate_tree(root, n_items=16, seed=1, progress=False)
    sampling.prepare(root, root.parent / "prepared", categories=None, sample=None, progress=False)
    return root, root.parent / "prepared" / "images.csv"
