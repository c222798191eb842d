"""The ledger's file lock: one writer at a time across processes and threads, readers beside
each other but not beside a writer, a clear timeout, nested connections in one thread shared."""
import subprocess
import sys
import threading
import time

import pytest

from vismem_assets.ledger import Ledger, LedgerLockTimeout

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "shared" else fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


def hold(lock_path, kind, seconds):
    """Another process holding the lock file, as another vismem run would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_path), kind, str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb", lock_timeout=0.3)
    assert ledger.schema_version() > 0  # created and migrated: a read-only ledger can open it
    return ledger


def test_a_writer_elsewhere_times_out_writers_and_readers_with_one_clear_error(ledger):
    proc = hold(ledger.lock_path, "exclusive", 30)
    try:
        for waiting in (ledger, Ledger(ledger.path, lock_timeout=0.3, read_only=True)):
            start = time.monotonic()
            with pytest.raises(LedgerLockTimeout, match="stayed locked for 0 s by another vismem process"):
                with waiting.connect():
                    pass
            assert 0.3 <= time.monotonic() - start < 5
    finally:
        proc.kill()
        proc.wait()
    with ledger.connect() as con:  # released with the process: the lock is free again
        assert con.execute("SELECT 1").fetchone() == (1,)


def test_readers_share_the_lock_and_a_writer_waits_for_them(ledger):
    proc = hold(ledger.lock_path, "shared", 30)
    try:
        reader = Ledger(ledger.path, lock_timeout=0.3, read_only=True)
        assert reader.query("SELECT count(*) AS n FROM schema_migrations")["n"][0] > 0
        with pytest.raises(LedgerLockTimeout):
            with ledger.connect():
                pass
    finally:
        proc.kill()
        proc.wait()


def test_threads_take_turns_and_nested_connections_share_one(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb", lock_timeout=30)
    events = []

    def second():
        with ledger.connect():
            events.append("second in")

    with ledger.transaction() as outer:
        with ledger.connect() as inner:  # nested in one thread: the same connection, no second lock
            assert inner is outer
        other = threading.Thread(target=second)
        other.start()
        time.sleep(0.3)
        events.append("first out")  # the other thread is still waiting for the lock
    other.join(10)
    assert events == ["first out", "second in"]
