"""`vismem`: the visual memory from the command line. Every subcommand prints a table for
people and, with --json, JSON for machines."""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import duckdb
import polars as pl

from .settings import Settings, SettingsError, setup

SHOWN_K = (1, 3, 5, 10, 20, 50, 100)


def positive_int(text: str) -> int:
    """argparse type: k = 0 or -5 used to be taken as k = 1 without a word."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def key_value(text: str) -> tuple[str, str]:
    """argparse type of --param: KEY=VALUE, KEY a plain name (it becomes a DuckDB variable)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a name such as requested_by, got {text!r}")
    return key, value


def _memory(args):
    from .memory import Memory

    memory = Memory(encoder=getattr(args, "encoder", None), settings=args.settings)
    if getattr(args, "writes", False) and not getattr(args, "dry_run", False):
        memory.ledger.check_writable()  # before any work: an add would otherwise embed, then fail to store
    return memory


def _print_json(obj) -> None:
    print(json.dumps(obj, default=str))


def _terminal_width() -> int:
    """The terminal's width: $COLUMNS if set, else the terminal's, else 80 (output to a pipe)."""
    return max(shutil.get_terminal_size().columns, 20)


def _table(frame: pl.DataFrame, width: int | None = None) -> None:
    """A table for people that fits the terminal: a grid when it fits, else one block per row
    ("column │ value", like psql's expanded display). No value is cut short in either; --csv
    and --json print the same data for machines."""
    width = width or _terminal_width()
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True,
                   fmt_str_lengths=60_000, fmt_table_cell_list_len=-1, tbl_width_chars=65_535):
        grid = str(frame)  # never squeezed by polars (65,535 is its most): it fits whole, or is pivoted below
    if frame.width == 0 or max(map(len, grid.splitlines())) <= width:
        print(grid)
    else:
        print(_records(frame, width))


def _cell(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _chunks(text: str, size: int) -> list[str]:
    """`text` in pieces of at most `size` characters that concatenate back to it, broken after
    a space where one is near the end, and at line breaks."""
    out = []
    for line in text.split("\n"):
        while len(line) > size:
            cut = line.rfind(" ", size // 2, size) + 1 or size
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return out


def _records(frame: pl.DataFrame, width: int) -> str:
    """One block per row, every line at most `width` characters; long values continue on the
    next lines under themselves."""
    key_width = min(max(len(c) for c in frame.columns), max(width // 3, 8))
    room = max(width - key_width - 3, 8)
    lines = []
    for i, row in enumerate(frame.iter_rows(named=True), 1):
        lines.append(f"-[ {i} of {len(frame)} ]".ljust(width, "-")[:max(width, 0)])
        for name, value in row.items():
            keys, values = _chunks(name, key_width), _chunks(_cell(value), room)
            for j in range(max(len(keys), len(values))):
                key = keys[j] if j < len(keys) else ""
                value = values[j] if j < len(values) else ""
                # a line that ends at a space keeps it: the pieces join back to the value exactly
                lines.append(f"{key.ljust(key_width)} │ {value}" if value else f"{key.ljust(key_width)} │")
    if not len(frame):
        lines += _chunks("no rows; columns: " + ", ".join(frame.columns), width)
    note = f"({frame.width} columns, too wide for {width} characters as a table: one block per row)"
    return "\n".join(lines + _chunks(note, width))


def _progress(args) -> bool | None:
    return False if args.json else None


def cmd_add(args) -> int:
    report = _memory(args).add(args.set_path, name=args.name, progress=_progress(args),
                               root=getattr(args, "root", None))  # `demo` calls this without --root
    if args.json:
        _print_json(report.to_dict())
        return 0
    i = report.ingest
    _table(pl.DataFrame({
        "image set": [i.image_set], "files": [i.n_files], "added": [i.added], "duplicates": [i.duplicates],
        "blocked": [i.blocked], "quarantined": [len(i.quarantined)], "embedded": [report.embedded],
        "img/s": [round(report.images_per_second, 1)], "index version": [report.index_version],
        "vectors": [report.n_vectors], "seconds": [round(report.seconds, 1)],
    }))
    if i.blocked:
        print(f"\n{i.blocked} file(s) hold images this memory was asked to forget, or near-copies of them: "
              "they stay out (blocklist)")
        if i.blocked_files:
            _table(pl.DataFrame(i.blocked_files))
    if i.quarantined:
        print(f"\n{len(i.quarantined)} file(s) quarantined (the rest of the set went in):")
        _table(pl.DataFrame(i.quarantined))
    if i.label_conflicts:
        print(f"\n{len(i.label_conflicts)} duplicate(s) arrived with another label; the stored label was kept:")
        _table(pl.DataFrame(i.label_conflicts))
    return 0


def _expand(paths: list[str]) -> list[Path]:
    """Files as given; folders become the image files inside them."""
    from .imagesets import IMAGE_EXTENSIONS

    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return out


def _usable(paths: list[Path]) -> tuple[list[Path], dict[Path, str]]:
    """(images the encoder can take, {refused path: why}): each input decoded once as the
    encoder will, within its bounds (size, pixels, aspect), so one bad file cannot fail the rest."""
    from .encoders.base import load_image

    good, bad = [], {}
    for path in paths:
        try:
            load_image(path).close()
        except ValueError as exc:  # what load_image raises for unreadable, special, huge or bomb files
            bad[path] = str(exc)
        else:
            good.append(path)
    return good, bad


def cmd_classify(args) -> int:
    memory = _memory(args)
    paths = _expand(args.paths)
    memory.live_index()  # an empty memory is one error before any input is decoded
    good, bad = _usable(paths)
    predictions = dict(zip(good, memory.classify(good, k=args.k, strategy=args.strategy, progress=_progress(args),
                                                 unknown=args.unknown, pruning=args.pruning))) if good else {}
    for path in paths:
        if path in bad:
            if args.json:
                _print_json({"path": str(path), "error": bad[path]})
            else:
                print(f"vismem classify: skipped: {bad[path]}", file=sys.stderr)
            continue
        p = predictions[path]
        if args.json:
            _print_json(p.to_dict())
            continue
        novel = f"; nearest neighbour at distance {p.nearest_distance:.3f}, beyond the memory's threshold" if p.unknown else ""
        print(f"\n{p.path}\n  -> {p.label}  (confidence {p.confidence:.2f}, {args.strategy} vote over k={args.k}{novel})")
        shown = p.neighbors[: args.show]
        _table(pl.DataFrame({
            "rank": [n.rank for n in shown], "label": [n.label for n in shown],
            "similarity": [round(n.similarity, 4) for n in shown], "weight": [round(n.weight, 4) for n in shown],
            "pruning": [round(n.pruning_factor, 3) for n in shown],
            "sample_id": [n.sample_id[:12] for n in shown], "image": [n.image_path for n in shown],
        }))
    if bad and not good:
        print(f"vismem classify: error: none of the {len(bad)} input(s) is an image vismem can read", file=sys.stderr)
        return 1
    return 0


def cmd_prune(args) -> int:
    memory = _memory(args)
    if args.off:
        memory.pruning.deactivate()
        _print_json({"pruning": "none"}) if args.json else print("pruning switched off: every sample votes fully")
        return 0
    if args.rollback:
        row = memory.pruning.rollback()
        _print_json({"active": row}) if args.json else print(
            f"rolled back to {row['name']} pruning (weights of index version {row['index_version']})" if row
            else "rolled back: no earlier weight set, pruning is off")
        return 0
    mode = "hard" if args.hard is not None else "soft"
    threshold = args.hard if args.hard is not None and args.hard > 0 else None
    changes = memory.pruning.plan(mode, threshold)
    result = None if args.dry_run else memory.pruning.activate(mode, threshold)
    if args.json:
        _print_json({"dry_run": args.dry_run, "pruning": mode, "per_label": changes.to_dicts(), "activated": result})
        return 0
    what = "down-weighted" if mode == "soft" else "excluded"
    print(f"{mode} pruning {'would change' if args.dry_run else 'changes'} {int(changes['changed'].sum())} of "
          f"{int(changes['samples'].sum())} samples ({what}); per label:")
    _table(changes.rename({"changed": what}))
    if result:
        print(f"active for classification: {mode} pruning, {result['params']} (index version {result['index_version']});"
              " vismem prune --off or --rollback to undo")
    return 0


def _edit_request(args, cls, **extra):
    """The request from the command line: one target (ids or files), who, why."""
    images = [str(p) for p in args.image or []]
    return cls(sample_ids=args.sample or [], images=images, requested_by=args.requested_by or "",
               reason=args.reason or "", **extra)


def _after_edit(args, memory, report) -> dict | None:
    """The evaluation after an edit: with $VISMEM_QUERY_SET, run again and compared; else a hint."""
    from .evaluation import query_set_path

    query_set = query_set_path(memory.settings, memory.layout)
    if report.dry_run or args.no_eval or query_set is None:
        if not args.json and not report.dry_run:
            print("evaluate the memory again with `vismem eval QUERY_SET` (with VISMEM_QUERY_SET set, relabel and "
                  "weight do it themselves)")
        return None
    result = memory.evaluating.again(query_set)
    if not args.json:
        before = "none before" if result["top1_before"] is None else f"{result['top1_before']:.4f} before"
        print(f"evaluation on {result['query_set']} ({result['vote']}): top-1 {result['top1']:.4f} now, {before}")
    return result


def _print_edit(args, report, what: str) -> None:
    verb = "would change" if report.dry_run else "changed"
    print(f"{what}: {verb} {report.n_changed} sample(s)" + (f", {report.unchanged} already so" if report.unchanged else "")
          + ("" if report.dry_run else f" (change {report.change_id})"))
    _table(pl.DataFrame({"sample_id": [c["sample_id"][:12] for c in report.changes],
                         "old": [str(c["old"]) for c in report.changes], "new": [str(c["new"]) for c in report.changes]}
                        ).head(args.show))
    if report.n_changed > args.show:
        print(f"... and {report.n_changed - args.show} more (--json lists them all; `vismem audit query "
              f"{'label_changes' if report.kind == 'relabel' else 'weight_changes'}` once applied)")


def cmd_relabel(args) -> int:
    from .relabel import RelabelRequest

    memory = _memory(args)
    report = memory.edits.relabel(_edit_request(args, RelabelRequest, to=args.to, label=args.label), dry_run=args.dry_run)
    if not args.json:
        _print_edit(args, report, f"relabel to {args.to!r}")
        if report.new_label:
            print(f"note: {args.to!r} is a label the memory did not hold before")
        for r in report.reliability:
            print(f"reliability k={r['k']} of index version {r['index_version']}: {r['rows_recounted']} sample(s) "
                  f"counted again (incrementally), v changed for {r['v_changed']}")
    evaluation = _after_edit(args, memory, report)
    if args.json:
        _print_json(report.to_dict() | {"evaluation": evaluation})
    return 0


def cmd_weight(args) -> int:
    from .relabel import WeightRequest

    memory = _memory(args)
    report = memory.edits.set_weights(_edit_request(args, WeightRequest, weight=args.weight), dry_run=args.dry_run)
    if not args.json:
        _print_edit(args, report, f"user weight {args.weight:g}")
        print("a neighbour's vote = strategy weight x pruning factor x user weight (0 excludes the sample)")
    evaluation = _after_edit(args, memory, report)
    if args.json:
        _print_json(report.to_dict() | {"evaluation": evaluation})
    return 0


def cmd_experiment(args) -> int:
    from .encoders import load_encoder
    from .experiments import run
    from .home import resolve_home

    home = resolve_home(args.settings.home)  # only for where results and the vector cache go: the memory is not touched
    out = Path(args.out or home / "reports" / "experiments")
    result = run(args.name, load_encoder(args.encoder or "efficientnet-lite0"), out, n_memory=args.n_memory,
                 n_queries=args.n_queries, cache_dir=home / "experiments" / "cache")
    if args.json:
        _print_json({"name": result.name, "summary": result.summary, "table": result.table.to_dicts(),
                     "chart": str(result.chart)})
        return 0
    print(f"{result.name} on Fashion-MNIST ({args.n_memory} memory, {args.n_queries} queries), "
          "on a copy: the live memory is not touched")
    _table(result.table)
    print(f"\nchart: {result.chart}\ntable: {result.chart.with_suffix('.csv')}")
    return 0


def cmd_bench(args) -> int:
    # The benchmarks live in the checkout, not in the wheel: run them from there.
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "suite.py").is_file():
        print("vismem bench: the benchmarks run from a checkout of vismem, not an installed package: "
              "in the checkout, run `python -m benchmarks.suite --quick`", file=sys.stderr)
        return 2
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from benchmarks.suite import main as bench_main

    return bench_main((["--quick"] if args.quick else []) + (["--json"] if args.json else [])
                      + (["--only", *args.only] if args.only else []))


def cmd_explain(args) -> int:
    from .explain import render

    memory = _memory(args)
    (prediction,) = memory.classify([Path(args.image)], k=args.k, strategy=args.strategy, progress=False)
    out = Path(args.out or Path(args.image).with_suffix("").name + "-explained.png")
    render(prediction, Path(args.image), out, strategy=args.strategy)
    if args.json:
        _print_json(prediction.to_dict() | {"out": str(out)})
    else:
        print(f"{args.image} -> {prediction.label} (confidence {prediction.confidence:.2f}); explanation: {out}")
    return 0


def cmd_shard_worker(args) -> int:
    from .shard_workers import ShardWorkerError, serve

    if not 0 <= args.shard < args.settings.shards:
        raise ShardWorkerError(f"shard {args.shard} is not one of the memory's {args.settings.shards} shards "
                               f"(VISMEM_SHARDS): start workers 0 to {args.settings.shards - 1}")
    serve(args.settings, args.shard)
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    serve(_memory(args), host=args.host, port=args.port)
    return 0


def cmd_eval(args) -> int:
    from .plots import plot_accuracy

    result = _memory(args).evaluate(args.set_path, k_max=args.k_max, progress=_progress(args),
                                    pruning=not args.no_pruning)
    if args.plot:
        plot_accuracy(result.accuracy, args.plot, title=f"{Path(args.set_path).name}: index v{result.index_version}")
    if args.json:
        _print_json(result.to_dict() | {"best": result.best().to_dicts(), "plot": args.plot})
        return 0
    print(f"{result.n_queries} queries ({result.n_skipped} unusable skipped, {result.n_in_memory} also stored in "
          f"the memory) against index version {result.index_version}\n")
    wide = (result.accuracy.filter(pl.col("k").is_in(SHOWN_K) & (pl.col("pruning") == "none"))
            .pivot(on="strategy", index="k", values="accuracy").sort("k"))
    _table(wide)
    print("\nbest k per strategy:")
    _table(result.best())
    for mode in ("soft", "hard"):
        if mode in result.accuracy["pruning"]:
            print(f"\nbest k per strategy with {mode} pruning:")
            _table(result.best(mode))
    if result.novelty:
        n = result.novelty
        print(f"\nnovelty (distance > {n['distance']:.3f}, the {n['percentile']:g}th percentile of the memory's own "
              f"nearest-neighbour distances): flagged {n['flagged_known']}/{n['n_known']} queries of known labels, "
              f"{n['flagged_unseen']}/{n['n_unseen']} of labels the memory lacks")
    print("\nreliability diagram (rank vote, k=20): accuracy per confidence bin")
    _table(result.calibration.filter(pl.col("n_queries") > 0))
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0


def cmd_status(args) -> int:
    status = {**_memory(args).status(), "settings": args.settings.model_dump(mode="json")}
    if args.json:
        _print_json(status)
        return 0
    print(f"memory home: {status['home']}\nledger:      {status['ledger']}\nencoder:     {status['encoder']}")
    print(f"samples:     {status['samples'] or 'none yet'}   image sets: {status['image_sets']}")
    print("pending:     {not_embedded} not embedded, {not_indexed} embedded but not indexed".format(**status["pending"])
          + ("  (a crash mid-add left them: `vismem rebuild` or the next add finishes them)" if
             status["pending"]["not_embedded"] or status["pending"]["not_indexed"] else ""))
    if status["live_indexes"]:
        print("\nlive index versions:")
        live = pl.DataFrame(status["live_indexes"])
        _table(live.select("version", "n_vectors", "index_type", "nprobe", "recall_at_10", "path", "files", "holes",
                           "created_at"))
        if live["holes"].sum():
            print("  holes: entries of forgotten vectors, erased in place; the next compaction (the Dagster job nightly_compaction, or vismem rebuild) "
                  "writes the index without them")
        for row in live.iter_rows(named=True):
            if row["build_reason"]:
                measured = f" (measured at the build of version {row['recall_measured_at']})" if row["recall_at_10"] else ""
                print(f"  version {row['version']}: {row['build_reason']}{measured}")
    if status["shard_table"] and status["shards"] > 1:
        print(f"\nshards: {status['shards']} (by sample id; each searched, its top k merged before the vote)")
        _table(pl.DataFrame(status["shard_table"]))
    if status["settings"]["shards"] != status["shards"] and status["shard_table"]:
        print(f"  VISMEM_SHARDS is {status['settings']['shards']} but this memory has {status['shards']} shard(s): "
              f"`vismem rebuild --shards {status['settings']['shards']}` re-shards it")
    p = status["index_policy"]
    print(f"\nindex policy: {p['kind']} (IVF-Flat from {p['ivf_from']:,} vectors when its recall@10 on held-out "
          f"memory vectors reaches {p['recall_floor']}; set with VISMEM_INDEX_TYPE, VISMEM_IVF_FROM, VISMEM_RECALL_FLOOR)")
    print(f"adds write delta files while they hold up to {p['delta_fraction']:.0%} of the base's vectors and number "
          f"{p['max_deltas']} or fewer, then fold into a new base (VISMEM_DELTA_FRACTION, VISMEM_MAX_DELTAS); exact bases are "
          f"written in pieces of {p['shard_mib']} MiB (VISMEM_SHARD_MIB)")
    if status.get("ivf_search"):
        s = status["ivf_search"]
        print(f"IVF-Flat search: calls of {s['min_batch']} queries or more over {s['min_mib']} MiB or more are searched list "
              f"by list ({s['kernel']} kernel, {s['threads']} threads); smaller ones by FAISS")
    if status["labels"]:
        print("\nactive samples per label:")
        _table(pl.DataFrame({"label": list(status["labels"]), "samples": list(status["labels"].values())}))
    print("\ndisk use:")
    _table(pl.DataFrame({"part": list(status["disk_bytes"]),
                         "MiB": [round(b / 2**20, 2) for b in status["disk_bytes"].values()]}))
    d = status["index_disk_bytes"]
    print(f"  indexes: {d['live_versions'] / 2**20:.2f} MiB in the live version(s), {d['retained_versions_only'] / 2**20:.2f}"
          f" MiB only {d['retained_versions']} retained version(s) name (the nightly compaction keeps its retain_versions), "
          f"{d['unreferenced'] / 2**20:.2f} MiB no version names (a crash's; the next change deletes them)")
    _print_blas(status.get("blas"))
    print("\nsettings (environment, then flags):")
    rows = args.settings.table()
    _table(pl.DataFrame({"variable": [r[0] for r in rows], "value": [r[1] for r in rows]}))
    return 0


def _print_blas(blas: dict | None) -> None:
    if not blas:
        return
    applied = "" if blas["applied"] else f" — NOT applied: {blas['not_applied_because']}"
    print(f"\nBLAS:        OPENBLAS_CORETYPE={blas['openblas_coretype'] or '(unset)'} ({blas['action']}: "
          f"{blas['reason']}){applied}")
    for lib in blas["libraries"]:
        print(f"             {lib['library']}: kernel {lib.get('kernel', '?')}, {lib.get('threads', '?')} threads")
    threads = ", ".join(f"{k} {v}" for k, v in blas["threads"].items())
    print(f"             threads: {threads}")
    if blas["faiss"]:
        f = blas["faiss"]
        print(f"             faiss flat search uses BLAS from queries x d = {f['distance_compute_blas_threshold']}, "
              f"blocks of {f['distance_compute_blas_query_bs']} queries x {f['distance_compute_blas_database_bs']} vectors")


def cmd_rebuild(args) -> int:
    memory = _memory(args)
    version = memory.rebuild(n_shards=args.shards)
    report = version.build
    if args.json:
        _print_json({**asdict(version), "build": report.to_dict() if report else None})
        return 0
    print(f"index version {version.version} written from the ledger and embeddings: "
          f"{version.n_vectors} vectors, {version.index_type}, sha256 {version.sha256[:16]}…, {version.path}"
          + (f" and {len(version.files) - 1} more file(s)" if len(version.files) > 1 else "")
          + (f", in {version.n_shards} shards" if version.n_shards > 1 else ""))
    if report:
        print(f"index type: {report.reason}")
        if report.sweep:
            _table(pl.DataFrame({"nprobe": [p for p, _ in report.sweep], "recall@10": [r for _, r in report.sweep]}))
    return 0


def cmd_forget(args) -> int:
    from .forgetting import ForgetRequest

    memory = _memory(args)
    if args.resume:
        resumed = memory.resume_forgetting()
        _print_json({"resumed": resumed}) if args.json else print(
            f"finished {len(resumed)} pending forget request(s)" + (f": {', '.join(resumed)}" if resumed else ""))
        return 0
    request = ForgetRequest(requested_by=args.requested_by or "", reason=args.reason or "",
                            sample_ids=args.sample or [], images=args.image or [], label=args.label,
                            image_set=args.set, category=args.category, external_ref=args.external_ref)
    report = memory.forget(request, dry_run=args.dry_run)
    if args.json:
        _print_json(report.to_dict())
        return 0
    if report.already_applied:
        print(f"request {report.request_id[:16]}… was already applied; nothing left to forget "
              f"(see: vismem audit query forget_requests)")
        return 0
    verb = "would forget" if report.dry_run else "forgot"
    print(f"{verb} {report.n_samples} sample(s) — request {report.request_id[:16]}…")
    if report.samples:
        _table(pl.DataFrame({"label": list(report.per_label()), "samples": list(report.per_label().values())}))
    if not report.dry_run:
        print(f"new live index version(s): {', '.join(report.index_versions) or 'none (no vectors held)'}")
        print(f"retained versions erased in place too: {', '.join(report.versions_rewritten) or 'none'}")
        print(f"embedding/image files purged: {report.files_removed}; took {report.seconds:.2f} s ("
              + ", ".join(f"{step.replace('_', ' ')} {s:.2f} s" for step, s in report.phases.items()) + ")")
        print("check it: vismem audit verify")
    return 0


def cmd_audit_verify(args) -> int:
    report = _memory(args).audit.verify()
    if args.json:
        _print_json(report.to_dict())
    else:
        print(f"deletions chain: {report.chain_rows} rows, head {report.chain_head[:16]}…")
        print("checked: " + ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in report.files_checked.items()))
        if report.blocklist:
            print(f"kept by design (the blocklist): {report.blocklist['sample_ids']} forgotten sha256, "
                  f"{report.blocklist['perceptual_hashes']} perceptual hashes")
        if report.ok:
            print("OK: the chain is intact and no forgotten sample exists in any index, embedding or image file")
        else:
            print(f"FAILED: {len(report.problems)} problem(s):", file=sys.stderr)
            for problem in report.problems:
                print(f"  - {problem}", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_audit_query(args) -> int:
    params = dict(args.param or [])
    frame = _memory(args).ledger.run_named(args.name, params)
    frame = frame.with_columns(pl.selectors.temporal().cast(pl.String))
    if args.json:
        _print_json(frame.to_dicts())
    elif args.csv:
        print(frame.write_csv(), end="")
    else:
        _table(frame)
    return 0


def cmd_audit_proof(args) -> int:
    from .forgetting import image_hash

    target = args.target
    sample_id = image_hash(target) if Path(target).is_file() else target
    result = _memory(args).audit.proof(sample_id)
    if args.json:
        _print_json(result)
        return 0 if result["present_nowhere"] else 1
    print(f"sample   {result['sample_id']}\nlabel    {result['label']}\nstatus   {result['status']}")
    print(f"arrived  {result['arrived_at']} with set(s) {result['arrived_with']}")
    for r in result["requests"]:
        print(f"forgotten on request {r['request_id'][:16]}… by {r['requested_by']} ({r['category'] or 'no category'}): "
              f"{r['reason']}\n  requested {r['requested_at']}, applied {r['applied_at']}, "
              f"versions rewritten {r['versions_rewritten']}\n  chain row seq={r['seq']} hash {r['row_hash'][:16]}…")
    if result["blocklist"]:
        b = result["blocklist"]
        print("kept on the blocklist (by design): its sha256" + (f" and perceptual hash {b['perceptual_hash']}"
                                                                  if b["perceptual_hash"] else f" ({b['note']})"))
    if result["present_nowhere"]:
        print("present nowhere now: no index file, embedding file or image holds it")
    else:
        print("NOT gone:" if result["status"] == "forgotten" else "not forgotten: it is still in the memory")
        for t in result["traces"]:
            print(f"  - {t}")
    return 0 if result["present_nowhere"] else 1


def cmd_demo(args) -> int:
    """The main job on built-in data: Fashion-MNIST folders -> memory -> evaluation table and plot."""
    from .fashion_mnist import write_image_folders

    memory = _memory(args)
    data = memory.layout.root / "demo-data"
    print(f"writing Fashion-MNIST image folders under {data} ({args.n_memory} memory, {args.n_queries} queries)")
    write_image_folders(data / "fashion-train", "train", args.n_memory, seed=0)
    write_image_folders(data / "fashion-test", "test", args.n_queries, seed=1)
    args.set_path, args.name = str(data / "fashion-train"), None
    cmd_add(args)
    args.set_path, args.k_max = str(data / "fashion-test"), 100
    args.plot = args.plot or str(memory.layout.root / "reports" / "demo-accuracy.png")
    print()
    return cmd_eval(args)


# Flags (argparse dest) that override the setting of the same name.
FLAG_SETTINGS = ("home", "index_type", "ivf_from", "recall_floor")


def build_parser() -> argparse.ArgumentParser:
    from .index_types import KINDS
    from .ledger import audit_queries
    from .voting import DEFAULT_STRATEGY, STRATEGIES

    parser = argparse.ArgumentParser(prog="vismem", description=__doc__)
    parser.add_argument("--home", help="memory home (default: $VISMEM_HOME, else ./vismem_home)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="print JSON instead of tables")
        p.set_defaults(func=func)
        return p

    def encoder_option(p):
        p.add_argument("--encoder", help="efficientnet-lite0 (default) | dinov2:DIR_OR_NAME | clip:DIR_OR_NAME; "
                                         "default: the one this memory used last")

    p = command("add", cmd_add, "ingest an image set (folder <set>/<label>/* or CSV/parquet manifest), embed, index")
    p.set_defaults(writes=True)
    p.add_argument("set_path")
    p.add_argument("--name", help="image set name (default: the folder or manifest name; a set of that name "
                                  "from another source is refused unless --name gives it)")
    p.add_argument("--root", metavar="DIR", help="manifests: the folder their paths must stay under "
                                                 "(default: the manifest's folder)")
    encoder_option(p)

    p = command("classify", cmd_classify, "predict labels for images (files or folders), with the deciding neighbours. "
                "A file that is not an image vismem can read (corrupt, too large, a decompression bomb, not a regular "
                "file) is reported on its own line (stderr; with --json, an object with an \"error\" field) and the "
                "rest are classified; the exit code is 0 when at least one image was classified, 1 when none could "
                "be, 2 for a usage error (such as a path that does not exist)")
    p.add_argument("paths", nargs="+")
    p.add_argument("--k", type=positive_int, default=20)
    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY)
    p.add_argument("--show", type=int, default=5, help="neighbours shown per image in the table")
    p.add_argument("--pruning", choices=("none", "soft", "hard"),
                   help="vote weights from pruning (default: the memory's active weight set, see vismem prune)")
    p.add_argument("--unknown", action="store_true",
                   help="answer 'unknown' when the nearest neighbour is farther than the memory's novelty threshold")
    encoder_option(p)

    p = command("serve", cmd_serve, "serve the memory over HTTP (FastAPI): POST /classify and /explain, GET /status "
                "and /healthz, the OpenAPI page at /docs; the encoder and index stay loaded, a new index version "
                "is picked up on the next request")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=positive_int, default=8000)
    encoder_option(p)

    p = command("shard-worker", cmd_shard_worker, "run the worker of one shard (a cluster with VISMEM_SHARDS > 1): "
                "it searches its shard and erases its files for a forget, taking tasks from the Celery queue "
                "vismem-shard-SHARD (VISMEM_BROKER_URL); at start it finishes what its shard owes a pending forget")
    p.add_argument("shard", type=int, help="the shard it serves, 0 to VISMEM_SHARDS - 1")

    p = command("prune", cmd_prune, "weight samples by reliability (soft) or exclude unreliable ones (hard); never deletes")
    p.set_defaults(writes=True)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--soft", action="store_true", help="vote weight 1.75 / (1 + v), v at k=10 (default)")
    how.add_argument("--hard", type=int, metavar="THRESHOLD", nargs="?", const=0,
                     help="exclude samples with v >= THRESHOLD at k=100 (no value: the least reliable tenth)")
    how.add_argument("--off", action="store_true", help="switch pruning off")
    how.add_argument("--rollback", action="store_true", help="go back to the previously active weight set")
    p.add_argument("--dry-run", action="store_true", help="report what would change; activate nothing")
    encoder_option(p)

    def edit_options(p):
        p.set_defaults(writes=True)
        p.add_argument("--requested-by", metavar="WHO", required=True)
        p.add_argument("--reason", metavar="WHY", required=True)
        p.add_argument("--dry-run", action="store_true", help="list what would change; change nothing")
        p.add_argument("--no-eval", action="store_true",
                       help="do not evaluate again afterwards (done when VISMEM_QUERY_SET names a query set)")
        p.add_argument("--show", type=int, default=20, help="changed samples listed in the table")

    p = command("relabel", cmd_relabel, "give samples another label, with history (label_history: old, new, who, "
                "why, when); pruning statistics follow incrementally and the next vote uses the new label")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sample", nargs="+", metavar="ID", help="sample ids (sha256 of the image bytes)")
    target.add_argument("--image", nargs="+", metavar="FILE", help="image files, matched by content")
    target.add_argument("--label", metavar="OLD", help="every active sample of this label")
    p.add_argument("--to", metavar="NEW", required=True, help="the new label (the label rule of image sets applies)")
    edit_options(p)

    p = command("weight", cmd_weight, "set a user vote weight on samples, with history (weight_history): a neighbour's "
                "vote = strategy weight x pruning factor x user weight; 0 excludes, 1 is the default")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sample", nargs="+", metavar="ID", help="sample ids (sha256 of the image bytes)")
    target.add_argument("--image", nargs="+", metavar="FILE", help="image files, matched by content")
    p.add_argument("--weight", type=float, metavar="W", required=True, help="W >= 0")
    edit_options(p)

    p = command("experiment", cmd_experiment,
                "the paper's lifelong experiments on Fashion-MNIST (never on the live memory): table + PNG")
    p.add_argument("name", choices=("label-noise", "new-classes", "memory-scaling", "novelty"))
    p.add_argument("--n-memory", type=int, default=2000)
    p.add_argument("--n-queries", type=int, default=500)
    p.add_argument("--out", help="folder for <name>.png and <name>.csv (default: <home>/reports/experiments)")
    encoder_option(p)

    p = command("bench", cmd_bench, "the benchmark suite: each figure next to its baseline from the same run")
    p.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    p.add_argument("--only", nargs="+", choices=("embedding", "search", "add", "forget", "index_types", "memory"))

    p = command("explain", cmd_explain, "render why an image gets its label: the query, its neighbours, the vote")
    p.add_argument("image")
    p.add_argument("--out", help="FILE.png or FILE.html (default: <image name>-explained.png)")
    p.add_argument("--k", type=positive_int, default=10)
    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY)
    encoder_option(p)

    p = command("eval", cmd_eval, "accuracy of every voting strategy for k = 1..k-max on a labelled query set")
    p.add_argument("set_path")
    p.add_argument("--no-pruning", action="store_true", help="skip the soft and hard pruning columns")
    p.add_argument("--k-max", type=positive_int, default=100)
    p.add_argument("--plot", help="write a PNG chart of accuracy against k here")
    encoder_option(p)

    p = command("status", cmd_status, "encoder, counts per label, live index version, disk use")
    encoder_option(p)

    p = command("rebuild", cmd_rebuild, "write a fresh index version from the ledger and embedding files")
    p.set_defaults(writes=True)
    encoder_option(p)
    p.add_argument("--shards", type=int, metavar="S",
                   help="re-shard the memory into S shards by sample id (default: as many as it has)")
    p.add_argument("--index-type", choices=KINDS,
                   help="index type to build (default $VISMEM_INDEX_TYPE, else auto: exact below --ivf-from vectors)")
    p.add_argument("--ivf-from", type=int, metavar="N", help="auto: IVF-Flat from N vectors (default 200,000)")
    p.add_argument("--recall-floor", type=float, metavar="R",
                   help="recall@10 an approximate index must reach on held-out memory vectors, else exact (default 0.95)")

    p = command("forget", cmd_forget, "forget samples for good: the index, retained versions, embeddings, images")
    p.set_defaults(writes=True)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sample", nargs="+", metavar="ID", help="sample ids (sha256 of the image bytes)")
    target.add_argument("--image", nargs="+", metavar="FILE", help="image files, matched by content")
    target.add_argument("--label", help="every sample of this label")
    target.add_argument("--set", help="every sample of this image set")
    target.add_argument("--resume", action="store_true", help="finish forget requests a crash left pending")
    p.add_argument("--requested-by", metavar="WHO")
    p.add_argument("--reason", metavar="TEXT")
    p.add_argument("--category", help="gdpr, license, quality, bias or other")
    p.add_argument("--external-ref", metavar="REF", help="e.g. a ticket number")
    p.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")

    audit = sub.add_parser("audit", help="verify, query and prove forgetting").add_subparsers(dest="audit", required=True)

    def audit_command(name, func, help):
        a = audit.add_parser(name, help=help, description=help)
        a.add_argument("--json", action="store_true", help="print JSON instead of tables")
        a.set_defaults(func=func)
        return a

    audit_command("verify", cmd_audit_verify, "check the deletions chain and that nothing forgotten remains anywhere")
    a = audit_command("query", cmd_audit_query, "run a named audit query from sql/audit/ (read-only: it cannot "
                                                "change the memory)")
    a.add_argument("name", help="one of: " + ", ".join(audit_queries()) + " (exactly these names, not paths)")
    a.add_argument("--param", action="append", type=key_value, metavar="KEY=VALUE",
                   help="set a query parameter (repeatable)")
    a.add_argument("--csv", action="store_true", help="print CSV")
    a = audit_command("proof", cmd_audit_proof, "proof of forgetting for one sample id or image file")
    a.add_argument("target", metavar="SAMPLE_ID_OR_FILE")

    p = command("demo", cmd_demo, "the main job on built-in data: Fashion-MNIST memory, evaluation table and plot")
    p.set_defaults(writes=True)
    p.add_argument("--n-memory", type=int, default=2000)
    p.add_argument("--n-queries", type=int, default=500)
    p.add_argument("--plot", help="PNG chart path (default: <home>/reports/demo-accuracy.png)")
    encoder_option(p)
    return parser


# Exit codes: 0 done, 1 the memory or the machine stopped it (see the line on stderr), 2 a
# usage error (argparse's own, a path that does not exist, a value the core refuses).
USAGE, FAILED = 2, 1
_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file size limit reached"}
# DuckDB, polars and FAISS report a full disk only in their own exceptions' text.
_DISK_FULL_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                   "File too large": errno.EFBIG}


def _known_error(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for a failure a user can act on; None for a bug (its traceback is
    what a report needs)."""
    code = exc.errno if isinstance(exc, OSError) else next(
        (c for text, c in _DISK_FULL_TEXT.items() if text in str(exc)), None)
    if code in _DISK_FULL:
        quoted = re.search(r'"(/[^"]+)"', str(exc))
        where = getattr(exc, "filename", None) or (quoted.group(1) if quoted else "the memory home")
        # Every write is atomic or in a transaction: the memory stays consistent, and running the
        # command again finishes it (pending work is picked up by the next writer).
        return FAILED, f"{_DISK_FULL[code]} while writing {where}: free space or move VISMEM_HOME, then run it again"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return USAGE, _oneline(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return FAILED, (f"cannot write {exc.filename or 'the memory home'}: read-only file system; run this where "
                        "it can write (the memory home: --home or VISMEM_HOME)")
    if isinstance(exc, PermissionError):  # ReadOnlyLedger and Layout.create say what to do; the OS does not
        return FAILED, _oneline(exc) + ("" if exc.errno is None else
                                         ": check its permissions, or run as a user who may use it")
    if isinstance(exc, ValueError):  # the core's validation: ImageSetError, ForgetError, unknown names...
        return USAGE, _oneline(exc)
    if isinstance(exc, (TimeoutError, RuntimeError, duckdb.Error, OSError)):  # LedgerLockTimeout, integrity...
        return FAILED, _oneline(exc)
    if type(exc).__module__.startswith("psycopg2"):  # the PostgreSQL ledger (psycopg2 loads only with one)
        return FAILED, f"the PostgreSQL ledger failed: {_oneline(exc)}"
    return None


def _oneline(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror.lower()}: {exc.filename}" if exc.filename else exc.strerror.lower()
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        # First, before the parser's imports load numpy: the BLAS set-up must precede OpenBLAS.
        setup()
    except SettingsError as exc:
        print(f"vismem: error: {exc}", file=sys.stderr)
        return USAGE
    args = build_parser().parse_args(argv)  # usage errors: argparse prints one and exits 2
    command = args.command + (f" {args.audit}" if args.command == "audit" else "")
    try:
        # The flags that set a setting override it (an invalid one is named by its field: recall_floor=7.0).
        args.settings = setup(Settings.from_env(**{name: getattr(args, name, None) for name in FLAG_SETTINGS}))
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe must reach the handler below
        return code
    except BrokenPipeError:
        # The reader went away (`vismem status | head -1`): stop quietly. Python flushes stdout
        # again at exit, so point it at /dev/null first (as the Python docs on SIGPIPE advise).
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (a test's capture)
            pass
        return FAILED
    except Exception as exc:
        known = _known_error(exc)
        if known is None:
            raise
        print(f"vismem {command}: error: {known[1]}", file=sys.stderr)
        return known[0]


if __name__ == "__main__":
    sys.exit(main())
