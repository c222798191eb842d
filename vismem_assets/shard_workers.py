"""Shard workers: each shard of the memory served by one Celery worker process, its searcher and
the one that erases its files for a forget (DESIGN.md, "Scale beyond one machine").

Worker j consumes the queue `vismem-shard-<j>` alone, at concurrency 1 in its own process (the
solo pool): it keeps its shard of the live index loaded and, on a task after a transaction has
committed (the ledger's change token), compares the live version row (version, file digests) and
the pending forget requests with what it loaded, and loads its own shard again when they changed. Vectors travel as raw float32 bytes and a shape
(kombu's JSON carries bytes as base64), never as JSON lists of floats. The coordinator
(`ShardClient`, used by Recall and Forgetting when `settings.shard_workers`) scatters a search to
every shard's queue, gathers with a timeout and merges the top k (shards.merge_top_k).

A forget: each shard's worker erases its own files and reports it in the ledger
(forgetting.erase_shard); a worker that does not answer leaves the
request pending. Starting a worker first finishes what its shard has not reported of every
pending forget, and the whole request once every shard has: restarting a dead worker finishes it.

    vismem shard-worker SHARD      # the worker of shard SHARD (0-based), until stopped
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout

from .forgetting import erase_shard, unreported_shards
from .index_store import IndexStore, searcher_of
from .settings import Settings

SEARCH = "vismem.shard.search"
ERASE = "vismem.shard.erase"
ERASE_WAIT = 10  # an erasure may take this many times the search timeout (it rewrites files)
log = logging.getLogger(__name__)


class ShardWorkerError(RuntimeError):
    """A shard's worker did not answer: names the shard and what to do."""


def queue_of(shard: int) -> str:
    return f"vismem-shard-{shard}"


def make_app(settings: Settings) -> Celery:
    """The Celery app of the shard workers and their clients: the broker and result backend of
    the settings (VISMEM_BROKER_URL, VISMEM_BROKER_BACKEND, as the cluster's Dagster steps use)."""
    if not settings.broker_url or not settings.broker_backend:
        raise ShardWorkerError("shard workers need VISMEM_BROKER_URL and VISMEM_BROKER_BACKEND: source the "
                               "cluster's cluster.env (scripts/cluster.sh up writes it), or unset "
                               "VISMEM_SHARD_WORKERS to search every shard in this process")
    app = Celery("vismem_shards", broker=settings.broker_url, backend=settings.broker_backend)
    # JSON only (Celery refuses pickle as root); one task at a time, none held for later.
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
                    result_expires=3600, worker_hijack_root_logger=False)
    return app


def pack(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": np.ascontiguousarray(array).tobytes()}


def unpack(packed: dict) -> np.ndarray:
    return np.frombuffer(packed["data"], np.dtype(packed["dtype"])).reshape(packed["shape"])


# ---- the worker --------------------------------------------------------------------------------

@dataclass
class _Loaded:
    key: tuple
    index: object     # kept: its searcher reads the index's own storage
    searcher: object
    held: int
    checked: bytes | None = None   # the ledger's change token when this was last checked


class ShardServer:
    """What worker `shard` holds: its shard of each encoder's live index, as loaded."""

    def __init__(self, settings: Settings, shard: int):
        from .memory import Memory  # (the memory's ledger and layout, opened as the CLI opens them)
        self.settings, self.shard = settings, shard
        self.memory = Memory(settings=settings.model_copy(update={"shard_workers": False}))
        self.ledger = self.memory.ledger
        self._stores: dict[str, IndexStore] = {}
        self._loaded: dict[str, _Loaded] = {}

    def store(self, encoder_id: str) -> IndexStore:
        if encoder_id not in self._stores:
            with self.ledger.connect() as s:
                self._stores = {store.encoder_id: store for store in self.memory.forgetting.index_stores(s)}
            if encoder_id not in self._stores:
                raise ShardWorkerError(f"this memory ({self.memory.layout.root}) has no index for encoder {encoder_id}")
        return self._stores[encoder_id]

    def search(self, encoder_id: str, queries: dict, k: int) -> dict:
        loaded = self._current(encoder_id)
        vectors = unpack(queries)
        sims, ids = loaded.searcher.search(vectors, min(k, loaded.held) if loaded.held else 1)
        return {"sims": pack(np.asarray(sims, np.float32)), "ids": pack(np.asarray(ids, np.int64)),
                "held": loaded.held}

    def _current(self, encoder_id: str) -> _Loaded:
        """This shard of the live version, loaded again only when the live row's (version, file
        digests) or the pending forgets changed (`load` leaves a pending request's vectors out)."""
        token = self.ledger.change_token()  # nothing committed since the last check: nothing to look up
        cached = self._loaded.get(encoder_id)
        if cached is not None and token is not None and cached.checked == token:
            return cached
        store = self.store(encoder_id)
        with self.ledger.connect() as s:
            live = store.live()
            pending = s.indexes.unfinished_forget_ids()
        if live is None:
            raise FileNotFoundError(f"no index for encoder {encoder_id} yet: add an image set first (vismem add)")
        if self.shard >= live.n_shards:
            raise ShardWorkerError(f"index version {live.version} has {live.n_shards} shards, and this is the worker "
                                   f"of shard {self.shard}: start workers for shards 0..{live.n_shards - 1} only")
        key = (live.version, tuple(f.sha256 for f in live.files), hash(np.sort(pending).tobytes()))
        if cached is None or cached.key != key:
            self._loaded.pop(encoder_id, None)  # let go of the old one before loading the new
            _, index = store.load_for_search(live, shard=self.shard)
            searcher, holes = searcher_of(index)
            cached = self._loaded[encoder_id] = _Loaded(key, index, searcher, index.ntotal - holes)
            log.info("shard %d: loaded version %d (%d vectors)", self.shard, live.version, cached.held)
        cached.checked = token
        return cached

    def erase(self, encoder_id: str, request_id: str, vector_ids: dict, n_shards: int, shard: int) -> int | None:
        if shard != self.shard:
            raise ShardWorkerError(f"an erasure of shard {shard} reached the worker of shard {self.shard}")
        store = self.store(encoder_id)
        if (n_shards, shard) not in unreported_shards(store, request_id):
            return None  # reported already (this worker finished it when it started, or a retry)
        return erase_shard(store, unpack(vector_ids), request_id, n_shards, shard)

    def finish_pending(self) -> list[str]:
        """At start: erase this shard's part of every pending forget it has not reported; then
        finish each request all of whose shards have reported (the rest of apply_pending, in
        this process). Returns the requests finished."""
        with self.ledger.connect() as s:
            pending = s.forgetting.pending_requests()
            stores = self.memory.forgetting.index_stores(s)
        finished = []
        for request_id in pending:
            with self.ledger.connect() as s:
                targets = s.forgetting.targets(request_id)
            vector_ids = np.sort(targets["vector_id"].drop_nulls().to_numpy().astype(np.int64))
            left = []
            for store in stores:
                live = store.live()
                for n_shards, shard in unreported_shards(store, request_id):
                    if shard == self.shard and live is not None and n_shards == live.n_shards:
                        erase_shard(store, vector_ids, request_id, n_shards, shard)
                        log.info("shard %d: erased its part of pending forget %s", self.shard, request_id)
                    elif live is not None and n_shards == live.n_shards:
                        left.append(shard)
            if left:
                log.warning("forget %s stays pending: shard(s) %s have not reported (their workers finish it when "
                            "they start, or `vismem forget --resume`)", request_id, left)
            else:  # every live shard reported: older shardings are erased here, then the proof
                finished += self.memory.resume_forgetting(only=request_id)
        return finished


def serve(settings: Settings, shard: int) -> None:
    """Run worker `shard`: finish pending forgets, then consume its queue, one task at a time."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = make_app(settings)
    server = ShardServer(settings, shard)
    app.task(name=SEARCH)(server.search)
    app.task(name=ERASE)(server.erase)
    done = server.finish_pending()
    if done:
        log.info("shard %d: finished pending forget(s) %s", shard, ", ".join(done))
    app.worker_main(["worker", "--pool=solo", "--concurrency=1", "-Q", queue_of(shard),
                     "-n", f"vismem-shard-{shard}@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle"])


# ---- the coordinator ---------------------------------------------------------------------------

class ShardClient:
    """The coordinator's side: a search scattered to every shard's worker and merged; a forget's
    erasures sent to them. Every shard of the live sharding must have its worker."""

    def __init__(self, settings: Settings):
        self.app = make_app(settings)
        self.n_workers = settings.shards
        self.timeout = settings.shard_timeout

    def _check(self, n_shards: int) -> None:
        if n_shards != self.n_workers:
            raise ShardWorkerError(
                f"the live index is in {n_shards} shard(s) but the shard workers are set for {self.n_workers} "
                f"(VISMEM_SHARDS): start one worker per shard with VISMEM_SHARDS={n_shards}, or "
                f"`vismem rebuild --shards {self.n_workers}`")

    def search(self, encoder_id: str, n_shards: int, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (n, min(k, N)): every shard's k best, merged."""
        from .shards import merge_top_k
        self._check(n_shards)
        queries = pack(np.ascontiguousarray(vectors, np.float32))
        sent = [(j, self.app.send_task(SEARCH, args=(encoder_id, queries, int(k)), queue=queue_of(j),
                                       expires=self.timeout)) for j in range(n_shards)]
        answers = self._gather(sent, self.timeout, "a search")
        parts = [(unpack(a["sims"]), unpack(a["ids"])) for a in answers if a["held"] > 0]
        if not parts:  # nothing held anywhere: as an empty index answers
            return unpack(answers[0]["sims"]), unpack(answers[0]["ids"])
        return merge_top_k(parts, max(1, min(k, sum(a["held"] for a in answers))))

    def send_erase(self, index_store: IndexStore, groups: list[tuple[int, int]], vector_ids: np.ndarray,
                   request_id: str) -> tuple["_Erasures", list[tuple[int, int]]]:
        """Send each group of the live sharding to its worker; returns (what to wait for, the
        groups left to erase in this process: an older sharding's)."""
        live = index_store.live()
        current = live.n_shards if live is not None else None
        remote = [g for g in groups if g[0] == current]
        if remote:
            self._check(current)
        ids = pack(np.asarray(vector_ids, np.int64))
        sent = [(j, self.app.send_task(ERASE, args=(index_store.encoder_id, request_id, ids, n, j), queue=queue_of(j)))
                for n, j in remote]
        return _Erasures(self, sent, request_id), [g for g in groups if g[0] != current]

    def _gather(self, sent: list, timeout: float, what: str, request_id: str | None = None) -> list:
        """Each (shard, result)'s answer, all within `timeout`; else an error naming the first
        shard that did not answer."""
        deadline = time.monotonic() + timeout
        answers = []
        for shard, result in sent:
            try:
                answers.append(result.get(timeout=max(deadline - time.monotonic(), 0.01), propagate=True))
            except CeleryTimeout:
                for _, other in sent:
                    other.forget()
                then = (f"forget request {request_id} stays pending (its samples are never found meanwhile): "
                        f"restart the worker of shard {shard}, which finishes it, or run `vismem forget --resume`"
                        if request_id else f"start or restart it (scripts/cluster.sh status shows shard-worker-{shard})")
                raise ShardWorkerError(f"the worker of shard {shard} (queue {queue_of(shard)}) did not answer {what} "
                                       f"within {timeout:.0f} s: {then}") from None
        return answers


@dataclass
class _Erasures:
    client: ShardClient
    sent: list
    request_id: str

    def wait(self) -> list[int | None]:
        """Each worker's new live version (or None), once every one has reported."""
        return self.client._gather(self.sent, self.client.timeout * ERASE_WAIT, "erasing its files",
                                   self.request_id)
