"""Shared fixtures: small real Fashion-MNIST image sets and the real default encoder,
built once per test session (embedding is the slow part)."""
from __future__ import annotations

from pathlib import Path

import pytest

from vismem_assets.settings import setup

# The tests' entry point: the BLAS set-up before numpy or faiss load, as the CLI does it.
setup()

from vismem_assets.encoders import load_encoder  # noqa: E402
from vismem_assets.fashion_mnist import write_image_folders  # noqa: E402
from vismem_assets.memory import Memory  # noqa: E402


@pytest.fixture(scope="session")
def encoder():
    return load_encoder("efficientnet-lite0")


@pytest.fixture(scope="session")
def fm_sets(tmp_path_factory) -> dict[str, Path]:
    """Image folders: 'train' (100 = 10 per class), 'more' (another 50), 'test' (40 queries)."""
    root = tmp_path_factory.mktemp("fashion-mnist")
    train_idx = write_image_folders(root / "train", "train", 100, seed=1)
    write_image_folders(root / "more", "train", 50, seed=2, exclude=train_idx)
    write_image_folders(root / "test", "test", 40, seed=3)
    return {name: root / name for name in ("train", "more", "test")}


@pytest.fixture
def memory(tmp_path, encoder) -> Memory:
    """An empty memory in a temp home, using the session's already loaded encoder."""
    return Memory(tmp_path / "home", encoder=encoder)


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server per test session (tests/postgres_server.py), stopped at its end."""
    from postgres_server import PostgresServer
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server, request) -> str:
    """A fresh database on the session's server, for one test's ledger."""
    import re
    import uuid
    name = re.sub(r"\W", "_", request.node.name)[:40].lower() + "_" + uuid.uuid4().hex[:6]
    return postgres_server.create_database(name)
