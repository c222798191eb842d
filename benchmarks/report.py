"""benchmarks/RESULTS.md from one `vismem bench --json` run: every figure beside its baseline
and target, taken from the JSON (nothing typed by hand).

    vismem bench --json > bench.json && python -m benchmarks.report bench.json > benchmarks/RESULTS.md
"""
from __future__ import annotations

import json
import sys

from . import peers


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.4g}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _met(value, target: str) -> str:
    if value is None:
        return "not measured"
    op, bound = target.split()[0], float(target.split()[1])
    ok = value >= bound if op == ">=" else value <= bound
    return "met" if ok else "**not met**"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return out + [""]


def render(r: dict, command: str = "vismem bench --json") -> str:
    d = r["details"]
    emb, search, add, forget = d.get("embedding", {}), d.get("search", {}), d.get("add", {}), d.get("forget", {})
    types, memory = d.get("index_types", {}), d.get("memory", {})
    lines = ["# Benchmark results", "",
             f"One full run of `{command}` on this machine ({r['threads']} threads; 2 cores, 24 GiB, shared"
             " and noisy). Each figure is next to its baseline, measured in the same process; ratios are what the"
             " targets are about. Reproduce with:", "",
             "```", "make bench                      # = vismem bench (tables)",
             "vismem bench --json > bench.json && python -m benchmarks.report bench.json > benchmarks/RESULTS.md",
             "```", "",
             "Scale runs use synthetic vectors clustered like real embeddings (`benchmarks/synthetic.py`): 100"
             " Gaussian cluster centres, each vector a centre plus Gaussian noise (σ = 0.6 per coordinate),"
             " L2-normalised; queries are held out from the same clusters and never stored.", "",
             "## Summary", ""]
    last = (forget.get("forget") or [{}])[-1]
    where = lambda run: f"{run.get('index_type')}, N = {_fmt(run.get('n'))}, d = {run.get('d')}"  # noqa: E731
    rows = [
        ["exact search GFLOP/s ÷ float32 GEMM GFLOP/s", r["search_gflops"], r["gemm_gflops"], r["search_ratio"],
         ">= 0.6", _met(r["search_ratio"], ">= 0.6")],
        ["embedding: full path ÷ bare encoder (img/s)", emb.get("images_per_second_full"),
         emb.get("images_per_second_bare"), r["embed_ratio"], ">= 0.85", _met(r["embed_ratio"], ">= 0.85")],
        [f"add 1% ÷ full rebuild (s), {where(add)}", add.get("add_seconds"), add.get("rebuild_seconds"),
         r["add_ratio"], "<= 0.05", _met(r["add_ratio"], "<= 0.05")],
        [f"forget {_fmt(last.get('samples'))} ÷ full rebuild (s), the whole request, {where(forget)}",
         last.get("seconds"), forget.get("rebuild_seconds"), r["forget_ratio"], "<= 0.05", _met(r["forget_ratio"], "<= 0.05")],
        [f"... of it, erasing in the index files (as the add: index work), {where(forget)}", last.get("index_seconds"),
         forget.get("rebuild_seconds"), r.get("forget_index_ratio"), "<= 0.05", _met(r.get("forget_index_ratio"), "<= 0.05")],
        [f"{r.get('ivf_type')} recall@10, N = {_fmt(r.get('ivf_n'))}", r["ivf_recall_at_10"], 1.0, r["ivf_recall_at_10"],
         ">= 0.95", _met(r["ivf_recall_at_10"], ">= 0.95")],
        [f"{r.get('ivf_type')} speed-up over exact (1,000 queries a call, as vismem searches it), N = {_fmt(r.get('ivf_n'))}",
         None, None, r["ivf_speedup"], ">= 20", _met(r["ivf_speedup"], ">= 20")],
        *[[f"searching process, {k}: anonymous RSS ÷ index size, N = {_fmt(run.get('n'))}, d = {run.get('d')}", None,
           t["index_mib"], t["anon_over_index"], "<= 1 (mmap)" if k != "flat" else "– (read whole)",
           _met(t["anon_over_index"], "<= 1") if k != "flat" else ""]
          for run in memory.get("runs", [memory] if memory else []) for k, t in run.get("types", {}).items()],
    ]
    lines += _table(["figure", "measured", "baseline", "ratio", "target", ""], rows)

    if search:
        lines += ["## Exact search", "",
                  f"N = {_fmt(search['n'])}, d = {search['d']}, k = {search['k']}; GEMM {search['gemm_gflops']} GFLOP/s"
                  f" ({search['gemm_size']}³ float32, same run). Ours = vismem's blocked GEMM search; FAISS = IndexFlatIP"
                  " with vismem's BLAS settings; FAISS default = its stock thresholds.", ""]
        lines += _table(["queries per batch", "ours qps", "ours GFLOP/s", "FAISS qps", "FAISS default qps",
                         "ours ÷ FAISS"],
                        [[b["batch"], b["ours_qps"], b["ours_gflops"], b["faiss_qps"], b["faiss_default_qps"],
                          b["speedup_vs_faiss"]] for b in search.get("batches", [])])
        c = search.get("classify")
        if c:
            lines += [f"`classify` (search + vote), {c['queries']} queries: {c['classify_qps']} qps against bare"
                      f" search {c['search_qps']} qps (ratio {c['ratio']}); {c['classify_gflops']} GFLOP/s ="
                      f" {c['classify_ratio_to_gemm']} × GEMM measured alongside.", ""]
    if emb:
        lines += ["## Embedding", "",
                  f"{emb['n']} Fashion-MNIST images, default encoder, backend {emb['backend']} ({emb['threads']} threads):"
                  f" full path {emb['images_per_second_full']} img/s against the bare forward"
                  f" {emb['images_per_second_bare']} img/s = {emb['embed_ratio']}. Bare forward per image:"
                  + ", ".join(f" {k} {v} ms" for k, v in emb.get("ms_per_image_bare", {}).items()) + "."
                  + "".join(f" The full path here is the {b['full_path']} one (decoding overlapped with the forward"
                            f" {b['embed_ratio_overlapped']}, sequential {b['embed_ratio_sequential']} of the bare"
                            " forward): `embed` overlaps only where a core is left over beside the forward's threads."
                            for b in [emb.get("backends", {}).get(emb["backend"], {})] if "full_path" in b), ""]
    for run in types.get("runs", [types] if types else []):
        lines += [f"## Index types, N = {_fmt(run['n'])}, d = {run['d']}", "",
                  f"{run['queries']} held-out queries, k = {run['k']}; exact search {run['exact_qps']} qps (baseline).", ""]
        for kind, t in run["types"].items():
            lines += [f"**{kind}** ({t['factory']}, {t['bytes_per_vector']} bytes/vector; trained on {_fmt(t['n_train'])}"
                      f" vectors in {t['train_seconds']} s, {_fmt(run['n'])} added in {t['add_seconds']} s): {t['verdict']}.", ""]
            point = t.get("operating_point")
            rows = [[c["nprobe"], c["recall_at_10"], c["recall_at_100"], c["qps"], c["speedup"]] for c in t["curve"]]
            if point and point["nprobe"] not in [c["nprobe"] for c in t["curve"]]:
                rows = sorted([*rows, [point["nprobe"], point["recall_at_10"], point["recall_at_100"], point["qps"],
                                       point["speedup"]]], key=lambda row: row[0])
            rows = [[f"**{r[0]}** (used)" if point and r[0] == point["nprobe"] else r[0], *r[1:]] for r in rows]
            lines += _table(["nprobe", "recall@10", "recall@100", "qps", "speed-up"], rows)
            if t.get("by_batch"):
                lines += [f"At nprobe {t['operating_point']['nprobe']}, by queries per call (FAISS = its `index.search`,"
                          " query by query; IVFSearcher = vismem's, list-batched: each probed list read once a call by a"
                          " compiled kernel that scores it against all the queries probing it, or FAISS's search below"
                          " its crossover; the same results up to float rounding):", ""]
                lines += _table(["queries per call", "exact qps", "FAISS IVF qps", "speed-up", "IVFSearcher qps",
                                 "speed-up", "IVFSearcher path"],
                                [[b["batch"], b["exact_qps"], b["ivf_qps"], b["speedup"], b.get("lists_qps"),
                                  b.get("lists_speedup"), b.get("lists_path") or "–"] for b in t["by_batch"]])
                first = next((b["lists_first_call_seconds"] for b in t["by_batch"] if b.get("lists_first_call_seconds")), None)
                if first:
                    lines += [f"The process's first list-batched call (loading the compiled kernel from numba's disk"
                              f" cache) took {first} s and is not among the repeats.", ""]
    for run in add.get("runs", [add] if add else []):
        lines += [f"## Add 1% ({_fmt(run['added'])} vectors) to N = {_fmt(run['n'])}, d = {run['d']}", "",
                  "The add writes a delta file of its vectors; an add that would take the deltas past 10% of the"
                  " base folds them into a new base instead (measured on its own, and amortised over the adds"
                  " of 1% between two folds).", ""]
        lines += _table(["index type", "base MiB (files)", "full rebuild s", "add s", "add ÷ rebuild", "folding add s",
                         "amortised ÷ rebuild"],
                        [[f"{k} ({t['index_type']})", f"{_fmt(t['file_mib'])} ({t.get('files', 1)})", t["rebuild_seconds"],
                          t["add_seconds"], t["add_ratio"], t.get("fold_seconds"), t.get("amortised_ratio")]
                         for k, t in run.get("types", {}).items()])
    for run in forget.get("runs", [forget] if forget else []):
        lines += [f"## Forget from N = {_fmt(run['n'])}, d = {run['d']}, {run['retained_versions']} retained"
                  " version beside the live one", "",
                  "Each forget erases in place (its vectors' bytes and ids overwritten in every index file and"
                  " embedding part that holds them), hashes each touched index file anew, deletes the images,"
                  " zeroes their file names, and chains the proof; seconds per step:", ""]
        steps = ("accept", "statistics", "embeddings", "image_files", "names", "proof", "finish")
        lines += _table(["index type", "samples", "forget s", "rebuild s", "forget ÷ rebuild", "index files s",
                         "index files ÷ rebuild", *(s.replace("_", " ") + " s" for s in steps)],
                        [[f"{k} ({t['index_type']})" + (f": image set {f['image_set']}" if "image_set" in f else ""),
                          f["samples"], f["seconds"], t["rebuild_seconds"], f["ratio_to_rebuild"], f["index_seconds"],
                          f["index_ratio"], *(f["phases"].get(s) for s in steps)]
                         for k, t in run.get("types", {}).items()
                         for f in t["forget"] + ([t["forget_set"]] if t.get("forget_set") else [])])
        lines += ["Samples are drawn at random: scattered over every shard, list and embedding part, the worst case"
                  " for total removal. The image set's samples arrived together and sit in one embedding part.", ""]
    for run in memory.get("runs", [memory] if memory else []):
        lines += [f"## Memory of a searching process, N = {_fmt(run['n'])}, d = {run['d']}", "",
                  f"The imports alone peak at {run['baseline_rss_mib']} MiB. Peak RSS counts a mapped file's"
                  " pages; anonymous memory is the process's own.", ""]
        lines += _table(["index type", "index file MiB", "peak RSS MiB", "peak above imports ÷ index",
                         "anonymous ÷ index"],
                        [[f"{k} ({t['index_type']})", t["index_mib"], t["search_rss_mib"], t["rss_over_index"],
                          t["anon_over_index"]] for k, t in run.get("types", {}).items()])
    lines += ["## Time per benchmark", ""] + _table(["benchmark", "seconds"], [[k, v] for k, v in r["seconds"].items()])
    # the peer benchmark's own runs (python -m benchmarks.peers), kept beside this one
    lines += [peers.render(run) for _, run in sorted(peers.runs_of().items(), key=lambda item: int(item[0]))]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report BENCH.json > benchmarks/RESULTS.md", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(render(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
