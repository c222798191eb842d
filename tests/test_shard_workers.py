"""Shard workers (issue 19) with real parts: Redis and PostgreSQL from scripts/services.sh, a memory
of 2 shards on the PostgreSQL ledger, and one real worker process per shard
(`vismem shard-worker J`). A search through the workers equals the in-process
search; a forget through them erases in each worker, both shards report, `audit verify` passes.
Then a worker dies in the middle of a forget (frozen with SIGSTOP until the other shard has
reported, then SIGKILL): the request stays pending, its samples are never found, the coordinator
says which shard to restart; restarting that worker finishes it. Again with `vismem forget
--resume` instead of a restart.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from postgres_server import free_port
from vismem_assets.forgetting import ForgetRequest
from vismem_assets.memory import Memory
from vismem_assets.settings import Settings
from vismem_assets.shard_workers import ShardWorkerError

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "scripts" / "services.sh"
WHO = dict(requested_by="dpo@example.com", reason="asked to be removed", category="gdpr")
TIMEOUT = 3.0  # VISMEM_SHARD_TIMEOUT here: an erasure is waited for 30 s

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def redis_url():
    folder = Path(tempfile.mkdtemp(prefix="vismem-redis-"))
    port = free_port()
    subprocess.run(["bash", str(SERVICES), "redis-start", str(folder / "redis"), str(port)], check=True,
                   capture_output=True, timeout=60)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", str(SERVICES), "redis-stop", str(folder / "redis")], check=False, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


class Workers:
    """One worker process per shard, each in a session of its own, logging to a file."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs, self.procs = env, logs, {}

    def start(self, shard: int) -> None:
        log = self.logs / f"shard-worker-{shard}.log"
        start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            self.procs[shard] = subprocess.Popen([sys.executable, "-m", "vismem_assets.cli", "shard-worker", str(shard)],
                                                 cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                 start_new_session=True)
        deadline = time.monotonic() + 120
        while " ready." not in log.read_text()[start:]:
            if self.procs[shard].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"shard worker {shard} did not start:\n{log.read_text()[start:][-3000:]}")
            time.sleep(0.2)

    def signal(self, shard: int, sig: int) -> None:
        os.kill(self.procs[shard].pid, sig)
        if sig == signal.SIGKILL:
            self.procs[shard].wait(30)

    def log(self, shard: int) -> str:
        return (self.logs / f"shard-worker-{shard}.log").read_text()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


@pytest.fixture(scope="module")
def served(postgres_server, redis_url, encoder, fm_sets, tmp_path_factory):
    """(in-process memory, coordinator through the workers, workers, query vectors, env)."""
    import psycopg2
    name = f"shard_workers_{os.getpid()}"
    url = postgres_server.create_database(name)
    home = postgres_server.home_dir() / name
    base = dict(home=home, ledger_url=url, shards=2)
    local = Memory(home, encoder=encoder, settings=Settings(**base))
    local.add(fm_sets["train"])
    local.add(fm_sets["more"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "VISMEM_HOME": str(home), "VISMEM_LEDGER_URL": url,
           "VISMEM_SHARDS": "2", "VISMEM_BROKER_URL": f"{redis_url}/0", "VISMEM_BROKER_BACKEND": f"{redis_url}/1",
           "VISMEM_SHARD_WORKERS": "1", "VISMEM_SHARD_TIMEOUT": str(TIMEOUT)}
    workers = Workers(env, tmp_path_factory.mktemp("worker-logs"))
    try:
        for j in range(2):
            workers.start(j)
        coordinator = Memory(home, encoder=encoder, settings=Settings(
            **base, shard_workers=True, broker_url=env["VISMEM_BROKER_URL"],
            broker_backend=env["VISMEM_BROKER_BACKEND"], shard_timeout=TIMEOUT))
        queries = encoder.embed(sorted(fm_sets["test"].rglob("*.png")), progress=False)
        yield local, coordinator, workers, queries, env
    finally:
        workers.stop()
        con = psycopg2.connect(postgres_server.url())
        con.autocommit = True
        con.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        con.close()


def fresh(local: Memory) -> Memory:
    """A new in-process reader of the same memory (nothing cached)."""
    return Memory(local.layout.root, encoder=local.encoder, settings=local.settings)


def same_search(coordinator: Memory, local: Memory, queries: np.ndarray, k: int) -> np.ndarray:
    sims, ids = coordinator.search(queries, k)
    want_sims, want_ids = fresh(local).search(queries, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(sims, want_sims, rtol=1e-6, atol=1e-6)
    return ids


def vismem(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vismem_assets.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def active_samples(local: Memory, n: int, offset: int) -> list[str]:
    return local.ledger.query("SELECT sample_id FROM samples WHERE status = 'active' ORDER BY sample_id "
                              f"LIMIT {n} OFFSET {offset}")["sample_id"].to_list()


def vector_ids_of(local: Memory, samples: list[str]) -> set[int]:
    frame = local.ledger.query("SELECT vector_id FROM samples WHERE sample_id IN (SELECT unnest(?::VARCHAR[]))",
                               [samples])
    return set(frame["vector_id"].to_list())


def state_and_reports(local: Memory, request_id: str) -> tuple[str, list[int]]:
    state = local.ledger.query("SELECT state FROM forget_requests WHERE request_id = ?", [request_id])["state"][0]
    shards = local.ledger.query("SELECT shard FROM forget_shard_reports WHERE request_id = ? ORDER BY shard",
                                [request_id])["shard"].to_list()
    return state, shards


def test_search_through_the_workers_equals_in_process(served, fm_sets):
    local, coordinator, workers, queries, _ = served
    for k in (1, 20, 1000):  # 1000: more than the memory holds
        same_search(coordinator, local, queries, k)
    images = sorted(fm_sets["test"].rglob("*.png"))[:10]
    def answers(memory):
        return [(p.label, [n.vector_id for n in p.neighbors]) for p in memory.classify(images, progress=False)]

    assert answers(coordinator) == answers(fresh(local))
    assert coordinator.recall._index_cache is None  # the coordinator never loaded a shard itself
    assert all(workers.log(j).count("vismem.shard.search") >= 3 for j in range(2))


def test_a_forget_through_the_workers_erases_in_each_and_reports_both(served):
    local, coordinator, workers, queries, env = served
    chosen = active_samples(local, 20, 0)
    gone = vector_ids_of(local, chosen)
    report = coordinator.forget(ForgetRequest(sample_ids=chosen, **WHO))
    assert state_and_reports(local, report.request_id) == ("applied", [0, 1])
    assert all("vismem.shard.erase[" in workers.log(j) and "succeeded" in workers.log(j) for j in range(2))
    ids = same_search(coordinator, local, queries, 200)
    assert not set(ids.ravel().tolist()) & gone
    done = vismem(env, "audit", "verify")
    assert done.returncode == 0, done.stdout + done.stderr


def wait_for(probe, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")


def forget_when_a_worker_dies(served, offset: int, dying: int) -> tuple[str, set[int], str]:
    """Forget 20 samples while the worker of shard `dying` dies mid-forget: frozen before the
    request is sent, killed with SIGKILL once the other shard reported. Returns (request id,
    vector ids, the coordinator's error)."""
    local, coordinator, workers, queries, _ = served
    chosen = active_samples(local, 20, offset)
    request = ForgetRequest(sample_ids=chosen, **WHO)
    errors: list[BaseException] = []

    def forget():
        try:
            coordinator.forget(request)
        except BaseException as e:  # noqa: BLE001 (handed to the test's thread)
            errors.append(e)

    workers.signal(dying, signal.SIGSTOP)
    thread = threading.Thread(target=forget)
    thread.start()
    other = 1 - dying
    wait_for(lambda: local.ledger.query("SELECT count(*) AS n FROM forget_shard_reports WHERE request_id = ?"
                                        " AND shard = ?", [request.request_id, other])["n"][0] == 1,
             60, f"shard {other} to report")
    workers.signal(dying, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive() and len(errors) == 1 and isinstance(errors[0], ShardWorkerError), errors
    return request.request_id, vector_ids_of(local, chosen), str(errors[0])


def assert_pending_and_never_found(served, request_id: str, gone: set[int], dead: int) -> None:
    local, coordinator, _, queries, env = served
    assert state_and_reports(local, request_id) == ("pending", [1 - dead])
    _, ids = fresh(local).search(queries, 200)  # in process: the erased shard and the other
    assert not set(ids.ravel().tolist()) & gone
    with pytest.raises(ShardWorkerError, match=f"worker of shard {dead} .*start or restart it"):
        coordinator.search(queries, 5)
    done = vismem(env, "audit", "verify")
    assert done.returncode == 1 and "still pending" in done.stdout + done.stderr


def test_a_worker_killed_mid_forget_leaves_it_pending_and_its_restart_finishes_it(served):
    local, coordinator, workers, queries, env = served
    request_id, gone, error = forget_when_a_worker_dies(served, 20, dying=0)
    assert "worker of shard 0" in error and "stays pending" in error and "vismem forget --resume" in error
    assert_pending_and_never_found(served, request_id, gone, dead=0)
    workers.start(0)  # finishes what shard 0 had not reported, then the request
    assert state_and_reports(local, request_id) == ("applied", [0, 1])
    assert "finished pending forget(s)" in workers.log(0)
    done = vismem(env, "audit", "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    ids = same_search(coordinator, local, queries, 200)
    assert not set(ids.ravel().tolist()) & gone


def test_a_worker_killed_mid_forget_and_vismem_forget_resume(served):
    local, coordinator, workers, queries, env = served
    request_id, gone, _ = forget_when_a_worker_dies(served, 40, dying=1)
    assert_pending_and_never_found(served, request_id, gone, dead=1)
    done = vismem(env, "forget", "--resume")
    assert done.returncode == 0 and "finished 1 pending forget request" in done.stdout, done.stdout + done.stderr
    assert state_and_reports(local, request_id) == ("applied", [0, 1])
    done = vismem(env, "audit", "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    workers.start(1)
    ids = same_search(coordinator, local, queries, 200)
    assert not set(ids.ravel().tolist()) & gone
