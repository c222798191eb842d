"""Shared fixtures: small real Fashion-MNIST image sets and the real default encoder,
built once per test session (embedding is the slow part)."""
from __future__ import annotations

import os
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


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (never a downloaded browser). Module-scoped and asked
    for first, so that a missing browser is reported before any server starts."""
    if os.environ.get("VISMEM_SKIP_BROWSER") == "1":
        pytest.skip("VISMEM_SKIP_BROWSER=1: the headless browser test is skipped on request")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package playwright is missing: run `make setup` "
                    "(or set VISMEM_SKIP_BROWSER=1 to skip the browser test)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` as root (it installs the Debian package "
                    "chromium), or `sudo apt-get install chromium` (or set VISMEM_SKIP_BROWSER=1)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield chromium
        finally:
            chromium.close()
