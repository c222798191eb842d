"""The BLAS set-up, decided once at start-up, before numpy or faiss load their OpenBLAS.

Exact search is a matrix multiplication, so its speed is the speed of the OpenBLAS kernel in
use. OpenBLAS picks that kernel per CPU when its library loads, unless OPENBLAS_CORETYPE names
one. numpy's wheel bundles OpenBLAS 0.3.31, faiss-cpu's an older 0.3.15 that knows fewer CPUs
(on this AMD Zen 4 it takes its AVX2 "Zen" kernel although the CPU has AVX-512), and some
machines here set OPENBLAS_CORETYPE to an old kernel for everyone. So, when an entry point
(the CLI, the Dagster code location, the benchmarks, the tests) calls `settings.setup()` first:

* read the CPU's flags (/proc/cpuinfo);
* choose SkylakeX where the CPU has AVX-512 (f, cd, bw, dq, vl), Haswell where it has AVX2 and
  FMA, and otherwise leave OpenBLAS to its own detection;
* set OPENBLAS_CORETYPE to that choice when it is unset, names a kernel older than the CPU
  supports, names a kernel this CPU lacks (OpenBLAS would die on an illegal instruction) or
  names one an OpenBLAS in use does not know (it then falls back to its generic Prescott
  kernel: 0.3.15 knows neither Cooperlake nor SapphireRapids);
* never choose a kernel the CPU lacks, not even when asked: VISMEM_OPENBLAS_CORETYPE=<kernel>
  is the user's explicit choice, used when the CPU supports it; VISMEM_BLAS_AUTO=0 turns all
  of this off (OPENBLAS_CORETYPE and faiss's settings stay as they are).

Measured on this 2-core Zen 4 (benchmarks/search.py --kernels; 4096^3 numpy GEMM / faiss flat
with 1,000 queries over 200,000 x 384, GFLOP/s, a quiet moment): Haswell 207 / 149-172,
Zen 207-213 / 163-170, SkylakeX 199 / 140-173, Prescott 39 / 27. On this CPU, whose AVX-512
units are 256 bits wide, the three modern kernels are within noise of one another; what
the set-up protects against is an old or unknown kernel, 4-5 times slower.

OPENBLAS_CORETYPE only counts if it is set before an OpenBLAS library loads: when numpy or
faiss were imported before the set-up ran, the report says the choice could not apply. That is
why it runs at the entry points and not at import: importing `vismem_assets` changes nothing.

FAISS: `IndexFlat.search` switches from its per-query SIMD scan to BLAS when
queries x dimension reaches `distance_compute_blas_threshold` (faiss 1.15: 128,000, i.e.
333 queries at d=384), and then calls sgemm once per block of
`distance_compute_blas_database_bs` (1,024) stored vectors. Measured on this 2-core machine
(benchmarks/search.py --faiss-crossover, N=100k, k=50), with blocks of 1,024 each of those
many small sgemm calls costs a thread synchronisation, and on a busy machine the BLAS path
stays slower than the scan up to about 200 queries; with blocks of 16,384 it beats the scan
from 4-16 queries at d=384 (1.1x at 16, 5x at 128, 7x at 256) and from 8 at d=1280. Hence
database blocks of 16,384 (query blocks of 1,024 keep faiss's scratch at 64 MiB) and a
threshold of 6,144 = 16 queries at d=384, 5 at d=1280. VISMEM_FAISS_BLAS_THRESHOLD overrides
it. (vismem's own exact search, search.py, does not go through FAISS for flat indexes.)

`blas_report()` says what was chosen and why, what each loaded OpenBLAS actually runs, with
how many threads, and faiss's settings; `vismem status` shows it.
"""
from __future__ import annotations  # annotations stay strings: no typing import

import os
import sys
from collections import namedtuple
from collections.abc import Iterable

# OpenBLAS DYNAMIC_ARCH kernels: name -> (tier, CPU flags the kernel executes).
# Tiers: 0 SSE era, 1 AVX, 2 AVX2 + FMA, 3 AVX-512.
_AVX512 = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
_AVX2 = frozenset({"avx", "avx2", "fma"})
KERNELS: dict[str, tuple[int, frozenset[str]]] = {
    "Katmai": (0, frozenset({"sse"})), "Coppermine": (0, frozenset({"sse"})),
    "Northwood": (0, frozenset({"sse2"})), "Banias": (0, frozenset({"sse2"})),
    "Athlon": (0, frozenset({"sse"})), "Opteron": (0, frozenset({"sse2"})),
    "Prescott": (0, frozenset({"sse2", "pni"})), "Opteron_SSE3": (0, frozenset({"sse2", "pni"})),
    "Core2": (0, frozenset({"ssse3"})), "Atom": (0, frozenset({"ssse3"})), "Nano": (0, frozenset({"ssse3"})),
    "Penryn": (0, frozenset({"sse4_1"})), "Dunnington": (0, frozenset({"sse4_1"})),
    "Barcelona": (0, frozenset({"sse4a"})), "Nehalem": (0, frozenset({"sse4_2"})),
    "Sandybridge": (1, frozenset({"avx"})),
    "Bulldozer": (1, frozenset({"avx", "fma4"})), "Piledriver": (1, frozenset({"avx", "fma", "fma4"})),
    "Steamroller": (1, frozenset({"avx", "fma", "fma4"})), "Excavator": (1, frozenset({"avx", "avx2", "fma"})),
    "Haswell": (2, _AVX2), "Zen": (2, _AVX2),
    "SkylakeX": (3, _AVX2 | _AVX512), "Cooperlake": (3, _AVX2 | _AVX512 | {"avx512_bf16"}),
    "SapphireRapids": (3, _AVX2 | _AVX512 | {"avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"}),
}
_BY_LOWER = {name.lower(): name for name in KERNELS}
# Names faiss-cpu 1.15's bundled OpenBLAS 0.3.15 does not accept ("Core not found"): it then runs
# its generic Prescott kernel, 4-5x slower here, whatever the CPU. Measured, not guessed.
NOT_PORTABLE = frozenset({"Cooperlake", "SapphireRapids"})

FAISS_BLAS_THRESHOLD = 6144      # queries x dimension from which faiss flat search uses BLAS
FAISS_DATABASE_BS = 16384        # stored vectors per faiss sgemm call (faiss default 1,024)
FAISS_QUERY_BS = 1024            # queries per faiss sgemm call (faiss default 4,096)

# kernel: what OPENBLAS_CORETYPE should hold (None: unset); action: "set", "keep" (leave the
# variable as it is) or "unset"; previous: OPENBLAS_CORETYPE as found; best: the newest kernel
# this CPU runs, by these rules. (A namedtuple: dataclasses and typing cost more to import.)
CoretypeDecision = namedtuple("CoretypeDecision", "kernel action reason previous best")


def best_kernel(flags: Iterable[str]) -> str | None:
    flags = set(flags)
    if KERNELS["SkylakeX"][1] <= flags:
        return "SkylakeX"
    if KERNELS["Haswell"][1] <= flags:
        return "Haswell"
    return None


def missing_flags(kernel: str, flags: Iterable[str]) -> list[str]:
    """The CPU flags `kernel` executes that the CPU lacks ([] when it can run it)."""
    return sorted(KERNELS[kernel][1] - set(flags))


def decide_coretype(flags: Iterable[str], previous: str | None = None, override: str | None = None,
                    auto: bool = True) -> CoretypeDecision:
    """Pure: the OPENBLAS_CORETYPE to use on a CPU with these /proc/cpuinfo flags, given the one
    found in the environment (`previous`) and the settings' openblas_coretype (`override`) and
    blas_auto. Never a kernel whose instructions the CPU lacks."""
    flags = {f.lower() for f in flags}
    previous = (previous or "").strip() or None
    best = best_kernel(flags)
    if not auto:
        return CoretypeDecision(previous, "keep", "automatic BLAS set-up turned off (VISMEM_BLAS_AUTO=0)",
                                previous, best)

    def choose(kernel: str | None, reason: str) -> CoretypeDecision:
        if kernel is None:
            return CoretypeDecision(None, "unset" if previous else "keep", reason, previous, best)
        same = previous is not None and previous.lower() == kernel.lower()
        return CoretypeDecision(kernel, "keep" if same else "set", reason, previous, best)

    note = ""
    override = (override or "").strip()
    if override:
        name = _BY_LOWER.get(override.lower())
        if name is None:
            note = f"VISMEM_OPENBLAS_CORETYPE={override} refused: not an OpenBLAS kernel name; "
        elif lacking := missing_flags(name, flags):
            note = f"VISMEM_OPENBLAS_CORETYPE={override} refused: this CPU lacks {', '.join(lacking)}; "
        else:
            warn = (f" (warning: faiss-cpu's OpenBLAS 0.3.15 does not know {name} and falls back to Prescott)"
                    if name in NOT_PORTABLE else "")
            return choose(name, f"user override VISMEM_OPENBLAS_CORETYPE={override}{warn}")
    has = {"SkylakeX": "AVX-512", "Haswell": "AVX2 and FMA"}.get(best or "", "")
    fallback = (f"{best}, the newest kernel it runs" if best else
                "unset, so OpenBLAS detects the CPU itself (it has neither AVX-512 nor AVX2+FMA)")
    if previous is None:
        if best is None:
            return choose(None, note + "OPENBLAS_CORETYPE unset and the CPU has neither AVX-512 nor AVX2+FMA: "
                                       "OpenBLAS's own detection is kept")
        return choose(best, note + f"OPENBLAS_CORETYPE unset; the CPU has {has}: {best}")
    name = _BY_LOWER.get(previous.lower())
    if name is None:
        return choose(best, note + f"OPENBLAS_CORETYPE={previous} is no OpenBLAS kernel (OpenBLAS would fall back "
                                   f"to its generic Prescott kernel): {fallback}")
    if lacking := missing_flags(name, flags):
        return choose(best, note + f"OPENBLAS_CORETYPE={previous} needs {', '.join(lacking)}, which this CPU lacks: "
                                   f"{fallback}")
    if name in NOT_PORTABLE:
        return choose(best, note + f"OPENBLAS_CORETYPE={previous} is unknown to faiss-cpu's OpenBLAS 0.3.15 (it "
                                   f"would fall back to its generic Prescott kernel): {fallback}")
    if best is not None and KERNELS[name][0] < KERNELS[best][0]:
        return choose(best, note + f"OPENBLAS_CORETYPE={previous} is older than the CPU supports ({has}): {best}")
    return CoretypeDecision(previous, "keep", note + f"OPENBLAS_CORETYPE={previous} runs on this CPU and is "
                                                     "not older than what it supports: kept", previous, best)


def read_cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The first processor's flags (empty when unknown, e.g. not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries already mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
        return sorted(p for p in paths if "/" in p)
    except OSError:  # no /proc: judge by the modules that bring one
        return [m for m in ("numpy", "faiss", "scipy") if m in sys.modules]


_state: dict = {}


def configure(settings, environ, cpuinfo: str = "/proc/cpuinfo") -> dict:
    """Decide and apply the BLAS set-up (once per process; cheap: no numpy, no faiss): `settings`
    gives blas_auto, openblas_coretype and faiss_blas_threshold; OPENBLAS_CORETYPE is read from
    and written to `environ`, the process environment the entry point passes."""
    if _state:
        return _state
    decision = decide_coretype(read_cpu_flags(cpuinfo), environ.get("OPENBLAS_CORETYPE"),
                               settings.openblas_coretype, settings.blas_auto)
    loaded = loaded_openblas()
    changed = decision.action in ("set", "unset")
    if decision.action == "set":
        environ["OPENBLAS_CORETYPE"] = decision.kernel
    elif decision.action == "unset":
        environ.pop("OPENBLAS_CORETYPE", None)
    if changed and loaded:
        applied, why = False, ("OpenBLAS was already loaded (numpy or faiss imported before the BLAS set-up): "
                               + ", ".join(os.path.basename(p) for p in loaded))
    else:
        applied, why = True, None
    _state.update(decision=decision, changed=changed, applied=applied, not_applied_because=why,
                  auto=settings.blas_auto, faiss=None, environ=environ, threshold=settings.faiss_blas_threshold)
    if settings.blas_auto:
        if "faiss" in sys.modules:
            configure_faiss(sys.modules["faiss"])
        else:  # faiss is heavy: set it up when something imports it, not now
            _after_import("faiss", configure_faiss)
    return _state


def configure_faiss(faiss=None) -> dict:
    """Set faiss's BLAS threshold and block sizes (see the module docstring)."""
    if faiss is None:
        import faiss
    try:
        faiss.cvar.distance_compute_blas_threshold = _state.get("threshold", FAISS_BLAS_THRESHOLD)
        faiss.cvar.distance_compute_blas_database_bs = FAISS_DATABASE_BS
        faiss.cvar.distance_compute_blas_query_bs = FAISS_QUERY_BS
        result = {"configured": True}
    except Exception as e:  # a faiss without these knobs: keep its defaults
        result = {"configured": False, "error": f"{type(e).__name__}: {e}"}
    _state["faiss"] = result
    return result


def _after_import(name: str, callback) -> None:
    """Run callback(module) right after `name` is first imported (a one-shot import hook)."""
    import importlib.util

    class Hook:  # a meta path finder (duck-typed: importlib.abc costs more to import than all of this)
        def find_spec(self, fullname, path=None, target=None):
            if fullname != name:
                return None
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            loader = getattr(spec, "loader", None)
            if loader is None or not hasattr(loader, "exec_module"):
                return spec
            original = loader.exec_module

            def exec_module(module):
                original(module)
                loader.exec_module = original
                try:
                    callback(module)
                except Exception:  # never break the import itself
                    pass

            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook())


def _openblas_libraries() -> list[dict]:
    """What each loaded OpenBLAS runs: its kernel (core name), version string and threads."""
    import ctypes

    out = []
    for path in loaded_openblas():
        if "/" not in path:
            continue
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        entry = {"library": os.path.basename(path)}
        for key, names, restype in (("kernel", ("openblas_get_corename", "scipy_openblas_get_corename64_"), ctypes.c_char_p),
                                    ("config", ("openblas_get_config", "scipy_openblas_get_config64_"), ctypes.c_char_p),
                                    ("threads", ("openblas_get_num_threads", "scipy_openblas_get_num_threads64_"), ctypes.c_int)):
            for fname in names:
                fn = getattr(lib, fname, None)
                if fn is not None:
                    fn.restype, fn.argtypes = restype, []
                    value = fn()
                    entry[key] = value.decode() if isinstance(value, bytes) else value
                    break
        out.append(entry)
    return out


def blas_report() -> dict:
    """The chosen kernel and why, whether it could apply, what each loaded OpenBLAS runs, threads,
    and faiss's BLAS settings (when faiss is loaded)."""
    if _state:
        state, d = _state, _state["decision"]
    else:  # library use without an entry point: nothing was decided
        state = {"applied": False, "not_applied_because": "the BLAS set-up did not run (settings.setup() at an entry point)"}
        d = CoretypeDecision(None, "none", "the BLAS set-up did not run", None, best_kernel(read_cpu_flags()))
    environ = state.get("environ", {})
    report = {
        "openblas_coretype": environ.get("OPENBLAS_CORETYPE"),
        "chosen": d.kernel, "action": d.action, "reason": d.reason, "previous": d.previous,
        "cpu_best_kernel": d.best,
        "applied": state["applied"],
        "not_applied_because": state["not_applied_because"],
        "libraries": _openblas_libraries(),
        "threads": {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    **{v: environ[v] for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")
                       if v in environ}},
        "faiss": None,
    }
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        cvar = faiss.cvar
        report["threads"]["faiss_omp"] = faiss.omp_get_max_threads()
        report["faiss"] = {
            "distance_compute_blas_threshold": cvar.distance_compute_blas_threshold,
            "distance_compute_blas_database_bs": cvar.distance_compute_blas_database_bs,
            "distance_compute_blas_query_bs": cvar.distance_compute_blas_query_bs,
            "configured_by_vismem": bool((state.get("faiss") or {}).get("configured")),
        }
    return report
