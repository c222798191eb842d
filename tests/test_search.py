"""Fast exact search (search.py) returns what FAISS flat returns, and the BLAS set-up (blas.py)
never picks a kernel the CPU lacks."""
import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from benchmarks.synthetic import clustered_vectors
from vismem_assets import blas
from vismem_assets.settings import Settings
from vismem_assets import search as fast
from vismem_assets.search import FlatSearcher, flat_searcher, topk_inner_product

TOL = 1e-5  # float32 inner products of unit vectors, summed in another order


def faiss_flat(x: np.ndarray, ids: np.ndarray | None = None):
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
    index.add_with_ids(x, np.arange(len(x)) if ids is None else ids)
    return index


def assert_same_neighbours(got, want, vectors, queries, id_to_row=None):
    """Same ids in the same order, up to ties: scores agree; within each run of (near-)tied
    scores the same ids, except the last run, which k may cut anywhere; reported scores are the
    true inner products of the reported ids."""
    (gs, gi), (ws, wi) = got, want
    assert gs.shape == ws.shape and gi.shape == wi.shape
    assert gs.dtype == np.float32 and gi.dtype == np.int64
    np.testing.assert_allclose(gs, ws, atol=TOL)
    rows = gi if id_to_row is None else id_to_row[gi]
    true = np.einsum("qkd,qd->qk", vectors[rows].astype(np.float64), queries.astype(np.float64))
    np.testing.assert_allclose(gs, true, atol=TOL)
    assert (np.diff(gs, axis=1) <= 0).all(), "best first"
    for q in range(len(ws)):
        runs = np.split(np.arange(ws.shape[1]), np.flatnonzero(np.diff(ws[q]) < -TOL) + 1)
        for run in runs[:-1]:
            assert set(gi[q, run]) == set(wi[q, run]), f"query {q}, ranks {run}"
        assert len(set(gi[q])) == gi.shape[1], "no neighbour twice"


@pytest.mark.parametrize("n, d, k, nq", [
    (1, 8, 1, 1),
    (50, 16, 100, 3),          # k > N: N neighbours
    (1000, 64, 10, 1),
    (5000, 384, 50, 1),
    (5003, 384, 50, 7),        # N not a multiple of the chunk
    (20000, 384, 50, 100),
    (20000, 128, 200, 333),
    (3000, 1280, 100, 20),
    (7000, 64, 1, 60),
])
def test_same_neighbours_as_faiss_flat(n, d, k, nq):
    x, _ = clustered_vectors(n, d, n_clusters=max(1, min(100, n // 10)), seed=n)
    q, _ = clustered_vectors(nq, d, n_clusters=max(1, min(100, n // 10)), seed=n)  # same centres
    q = q + 0.01 * np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    want = faiss_flat(x).search(q, min(k, n))
    got = topk_inner_product(x, q, k)
    assert got[0].shape == (nq, min(k, n))
    assert_same_neighbours(got, want, x, q)


@pytest.mark.parametrize("gather_cost", [0, 16, 10**9])  # always gather chunks / by cost / always a full pass
@pytest.mark.parametrize("block_bytes, k", [(1, 5), (4 * 64 * 7, 50), (4 * 1000 * 7, 50), (1 << 20, 300)])
def test_many_small_blocks_and_query_blocks(monkeypatch, block_bytes, k, gather_cost):
    """Blocks of a few chunks (the k-th chunk maximum bound needs k chunks: finer chunks, or with
    fewer scores than k every score a candidate), several blocks per query block, several query
    blocks; candidates gathered chunk by chunk or found in one pass over the block."""
    monkeypatch.setattr(fast, "MAX_QUERY_BLOCK", 16)
    monkeypatch.setattr(fast, "GATHER_COST", gather_cost)
    x, _ = clustered_vectors(3001, 48, n_clusters=20, seed=3)
    q, _ = clustered_vectors(40, 48, n_clusters=20, seed=4)
    got = topk_inner_product(x, q, k, block_bytes=block_bytes)
    assert_same_neighbours(got, faiss_flat(x).search(q, k), x, q)


def test_queries_from_the_memory_itself_find_themselves_first():
    x, _ = clustered_vectors(4000, 64, seed=5)
    sims, pos = topk_inner_product(x, x[::7], 3)
    assert (pos[:, 0] == np.arange(0, 4000, 7)).all()
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=TOL)


def test_exact_ties_lower_position_first_same_set_as_faiss():
    x, _ = clustered_vectors(2000, 32, seed=6)
    dup = [3, 10, 700, 1500, 1999]
    x[dup] = x[3]
    q = x[3:4].copy()
    sims, pos = topk_inner_product(x, q, 4)
    assert pos[0].tolist() == [3, 10, 700, 1500]  # 5 tied: the 4 lowest positions, in order
    assert len(set(sims[0].tolist())) == 1
    flat = faiss.IndexFlatIP(32)
    flat.add(x)
    fsims, fpos = flat.search(q, 4)
    assert set(fpos[0]) == set(pos[0])  # faiss keeps the same set (and lists it highest position first)
    np.testing.assert_array_equal(fsims, sims)
    # all 5 with k = 5 and a tie that is not at the boundary
    assert topk_inner_product(x, q, 6)[1][0, :5].tolist() == dup


def test_inputs_are_checked():
    x, _ = clustered_vectors(100, 16)
    with pytest.raises(ValueError, match="empty memory"):
        topk_inner_product(np.empty((0, 16), np.float32), x[:2], 5)
    with pytest.raises(ValueError, match="dimension"):
        topk_inner_product(x, np.ones((2, 8), np.float32), 5)
    with pytest.raises(ValueError, match="2-d"):
        topk_inner_product(x, x[0], 5)
    with pytest.raises(ValueError, match="k must"):
        topk_inner_product(x, x[:2], 0)
    sims, pos = topk_inner_product(x, x[:0], 5)
    assert sims.shape == (0, 5) and pos.shape == (0, 5)
    # float64 and strided queries are converted, not refused
    got = topk_inner_product(x, x[:4].astype(np.float64), 5)
    assert_same_neighbours(got, faiss_flat(x).search(x[:4], 5), x, x[:4])
    got = topk_inner_product(x[::2], x[:8:2], 5)
    assert_same_neighbours(got, faiss_flat(x[::2].copy()).search(x[:8:2].copy(), 5), x[::2], x[:8:2])


def test_searcher_reads_a_faiss_index_and_maps_ids():
    x, _ = clustered_vectors(3000, 40, seed=7)
    ids = np.random.default_rng(0).permutation(10**6)[:3000].astype(np.int64)
    index = faiss_flat(x, ids)
    searcher = flat_searcher(index)
    assert isinstance(searcher, FlatSearcher) and len(searcher) == 3000
    assert not searcher.vectors.flags.owndata  # a view of the index's own storage: no copy
    q = x[:25] + 0.05
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    id_to_row = np.zeros(10**6, np.int64)
    id_to_row[ids] = np.arange(3000)
    assert_same_neighbours(searcher.search(q, 30), index.search(q, 30), x, q, id_to_row)
    assert not np.array_equal(searcher.search(q, 30)[1], flat_searcher(faiss_flat(x)).search(q, 30)[1])
    bare = faiss.IndexFlatIP(40)
    bare.add(x)
    assert_same_neighbours(flat_searcher(bare).search(q, 30), bare.search(q, 30), x, q)
    # not flat inner product, or empty: no fast searcher (the caller uses FAISS)
    assert flat_searcher(faiss.IndexFlatL2(40)) is None
    assert flat_searcher(faiss.IndexIDMap2(faiss.IndexFlatIP(40))) is None
    hnsw = faiss.IndexHNSWFlat(40, 8, faiss.METRIC_INNER_PRODUCT)
    assert flat_searcher(hnsw) is None


@pytest.fixture(scope="module")
def synthetic_memory(tmp_path_factory, encoder):
    from benchmarks.synthetic import build_memory

    return build_memory(tmp_path_factory.mktemp("search") / "home", 3000, encoder)


def test_memory_search_matches_faiss_on_its_live_index(synthetic_memory):
    memory = synthetic_memory
    _, index = memory.live_index()
    from vismem_assets.index_store import index_ids, index_vectors

    vectors, ids = index_vectors(index), index_ids(index)
    id_to_row = np.full(ids.max() + 1, -1, np.int64)
    id_to_row[ids] = np.arange(len(ids))
    q, _ = clustered_vectors(64, index.d, seed=0)  # the memory's own cluster centres
    q = q + 0.02 * np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for k, nq in ((1, 1), (10, 5), (50, 64), (5000, 3)):
        got = memory.search(q[:nq], k)
        assert got[0].shape == (nq, min(k, index.ntotal))
        assert_same_neighbours(got, index.search(q[:nq], min(k, index.ntotal)), vectors, q[:nq], id_to_row)
    held = memory.recall.live_files().searchers()
    memory.search(q[:1], 5)
    assert memory.recall.live_files().searchers()[0][0] is held[0][0] is not None  # kept between searches


def test_memory_searcher_follows_the_live_version(synthetic_memory):
    memory = synthetic_memory
    _, index = memory.live_index()
    q = memory.search(np.ones((1, index.d), np.float32) / np.sqrt(index.d), 5)
    before = memory.recall.live_files().searchers()[0][0]
    rebuilt = memory.rebuild()
    again = memory.search(np.ones((1, index.d), np.float32) / np.sqrt(index.d), 5)
    assert memory.recall.live_files().key[0] == rebuilt.version
    assert memory.recall.live_files().searchers()[0][0] is not before   # the new version's file, loaded
    np.testing.assert_array_equal(q[1], again[1])


# ---- blas.py -----------------------------------------------------------------------------------

AVX512 = {"sse2", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma",
          "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
AVX2 = {"sse2", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma"}
AVX512F_ONLY = AVX2 | {"avx512f"}  # e.g. Knights Landing: no bw/vl/dq
SSE = {"sse", "sse2", "pni", "ssse3", "sse4_1", "sse4_2"}
CPUS = {"avx512": AVX512, "avx512_bf16": AVX512_BF16, "avx2": AVX2, "avx512f_only": AVX512F_ONLY,
        "sse": SSE, "none": set()}


def decide(flags, env: dict):
    """decide_coretype given OPENBLAS_CORETYPE and the settings openblas_coretype and blas_auto as variables."""
    auto = env.get("VISMEM_BLAS_AUTO", "1") not in ("0", "false", "off")
    return blas.decide_coretype(flags, env.get("OPENBLAS_CORETYPE"), env.get("VISMEM_OPENBLAS_CORETYPE"), auto)


@pytest.mark.parametrize("flags, kernel", [(AVX512, "SkylakeX"), (AVX512_BF16, "SkylakeX"), (AVX2, "Haswell"),
                                           (AVX512F_ONLY, "Haswell"), (SSE, None), (set(), None)])
def test_unset_coretype_gets_the_newest_kernel_the_cpu_runs(flags, kernel):
    d = decide(flags, {})
    assert d.kernel == kernel and d.best == kernel
    assert d.action == ("set" if kernel else "keep")


@pytest.mark.parametrize("flags, env, kernel, action", [
    (AVX512, {"OPENBLAS_CORETYPE": "Haswell"}, "SkylakeX", "set"),        # older than supported
    (AVX512, {"OPENBLAS_CORETYPE": "zen"}, "SkylakeX", "set"),            # (names are case-insensitive)
    (AVX512, {"OPENBLAS_CORETYPE": "Prescott"}, "SkylakeX", "set"),
    (AVX512, {"OPENBLAS_CORETYPE": "SkylakeX"}, "SkylakeX", "keep"),
    (AVX512_BF16, {"OPENBLAS_CORETYPE": "Cooperlake"}, "SkylakeX", "set"),  # runs, but faiss's OpenBLAS: Prescott
    (AVX512, {"OPENBLAS_CORETYPE": "Cooperlake"}, "SkylakeX", "set"),     # needs avx512_bf16: lacking
    (AVX2, {"OPENBLAS_CORETYPE": "SkylakeX"}, "Haswell", "set"),          # would be an illegal instruction
    (AVX2, {"OPENBLAS_CORETYPE": "Zen"}, "Zen", "keep"),
    (AVX2, {"OPENBLAS_CORETYPE": "Sandybridge"}, "Haswell", "set"),
    (SSE, {"OPENBLAS_CORETYPE": "Haswell"}, None, "unset"),               # nothing better to choose: unset
    (SSE, {"OPENBLAS_CORETYPE": "Nehalem"}, "Nehalem", "keep"),
    (AVX512, {"OPENBLAS_CORETYPE": "NoSuchCore"}, "SkylakeX", "set"),     # OpenBLAS would use Prescott
    (SSE, {"OPENBLAS_CORETYPE": "NoSuchCore"}, None, "unset"),
    (AVX512, {"OPENBLAS_CORETYPE": ""}, "SkylakeX", "set"),
])
def test_existing_coretype(flags, env, kernel, action):
    d = decide(flags, env)
    assert (d.kernel, d.action) == (kernel, action), d.reason


def test_user_override_is_respected_when_the_cpu_runs_it():
    d = decide(AVX512, {"VISMEM_OPENBLAS_CORETYPE": "Haswell"})
    assert (d.kernel, d.action) == ("Haswell", "set") and "user override" in d.reason
    d = decide(AVX512, {"VISMEM_OPENBLAS_CORETYPE": "haswell", "OPENBLAS_CORETYPE": "Haswell"})
    assert (d.kernel, d.action) == ("Haswell", "keep")
    # ... and refused when it does not: never a kernel the CPU lacks, nor an unknown name
    d = decide(AVX2, {"VISMEM_OPENBLAS_CORETYPE": "SkylakeX"})
    assert d.kernel == "Haswell" and "refused" in d.reason and "avx512" in d.reason
    d = decide(AVX512, {"VISMEM_OPENBLAS_CORETYPE": "Skylake-X"})
    assert d.kernel == "SkylakeX" and "refused" in d.reason


def test_auto_can_be_turned_off():
    for value in ("0", "false", "off"):
        d = decide(AVX512, {"VISMEM_BLAS_AUTO": value, "OPENBLAS_CORETYPE": "Prescott"})
        assert (d.kernel, d.action) == ("Prescott", "keep") and "VISMEM_BLAS_AUTO=0" in d.reason
        d = decide(AVX512, {"VISMEM_BLAS_AUTO": value})
        assert (d.kernel, d.action) == (None, "keep")


@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_never_a_kernel_the_cpu_lacks(cpu):
    flags = CPUS[cpu]
    names = [None, "", "bogus", *blas.KERNELS, *(n.upper() for n in blas.KERNELS)]
    for current in names:
        for override in names:
            env = {k: v for k, v in (("OPENBLAS_CORETYPE", current), ("VISMEM_OPENBLAS_CORETYPE", override)) if v is not None}
            d = decide(flags, env)
            if d.action == "set":
                assert not blas.missing_flags(d.kernel, flags), (cpu, env, d)
            if d.action == "keep" and d.kernel is not None and d.kernel.lower() in {n.lower() for n in blas.KERNELS}:
                name = next(n for n in blas.KERNELS if n.lower() == d.kernel.lower())
                assert not blas.missing_flags(name, flags), (cpu, env, d)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert blas.read_cpu_flags(str(info)) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert blas.read_cpu_flags(str(tmp_path / "missing")) == set()


def test_configure_sets_the_variable_and_says_it_came_too_late(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t: " + " ".join(sorted(AVX2)) + "\n")
    monkeypatch.setattr(blas, "_state", {})
    env = {"OPENBLAS_CORETYPE": "Prescott"}
    state = blas.configure(Settings.defaults(), env, str(info))
    assert env["OPENBLAS_CORETYPE"] == "Haswell"
    assert state["decision"].action == "set"
    # numpy is loaded in this test process: the variable was set too late for it
    assert state["applied"] is False and "already loaded" in state["not_applied_because"]


def test_fresh_process_applies_the_choice_and_reports_it():
    """End to end: the set-up run first (as an entry point does) makes numpy's and faiss's OpenBLAS run the chosen kernel."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "VISMEM_OPENBLAS_CORETYPE",
                                                            "VISMEM_BLAS_AUTO")}
    code = ("import json\nfrom vismem_assets.settings import setup\nsetup()\nimport numpy, faiss\n"
            "from vismem_assets.blas import blas_report\nprint(json.dumps(blas_report()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout)
    best = blas.best_kernel(blas.read_cpu_flags())
    assert report["chosen"] == best and report["cpu_best_kernel"] == best
    assert report["applied"] is True and report["openblas_coretype"] == best
    if best is not None:
        kernels = {lib["library"]: lib.get("kernel") for lib in report["libraries"]}
        assert kernels and all(k == best for k in kernels.values()), kernels
    assert report["faiss"]["distance_compute_blas_threshold"] == blas.FAISS_BLAS_THRESHOLD
    assert report["faiss"]["configured_by_vismem"] is True
    assert report["threads"]["cpus"] >= 1


@pytest.mark.slow
def test_status_shows_the_blas_choice(tmp_path):
    env = {**os.environ, "VISMEM_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "vismem_assets.cli", "status"]
    status = json.loads(subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, check=True,
                                       timeout=120).stdout)
    assert {"chosen", "reason", "applied", "libraries", "threads", "faiss"} <= set(status["blas"])
    text = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=120).stdout
    assert "BLAS:" in text and "OPENBLAS_CORETYPE=" in text


def test_search_in_a_forked_child():
    """The helper threads of the parent do not exist in a forked child: it must not wait on them."""
    x, _ = clustered_vectors(50_000, 32, seed=8)
    q = x[:100]
    want = topk_inner_product(x, q, 10)  # the parent's pool exists now
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            got = topk_inner_product(x, q, 10)
            os.write(write, b"ok" if np.array_equal(got[1], want[1]) else b"different")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 16) == b"ok"
