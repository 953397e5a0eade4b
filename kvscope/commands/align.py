"""`kvscope align`: project any nsys export's NVTX ranges onto its GPU operations (filtered by domain, name, time
window and process; another engine's ranges labelled by a phase map), align kvscope ranges with a run's timings,
and write the tables into a folder written whole or not at all (torch-free). Tables that need kvscope's ranges are
skipped, with one line saying which and why, when the export has none. Where the model and the shape are known (a
run folder's metadata, or `--model` with `--batch`/`--seq` for a foreign export), each kernel class of the prefill and
decode steps against its roofline (class_roofline.parquet)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from kvscope.analysis.align.class_roofline import (
    RooflineFacts,
    RooflineRequest,
    class_roofline,
    class_roofline_table,
    roofline_facts,
    roofline_request,
)
from kvscope.analysis.align.pipeline import AlignResult, analyse, output_folder, summary_tables, write
from kvscope.analysis.align.ranks import analyse_ranks, ranks_table, refuse_rank_filters, write_ranks
from kvscope.analysis.inputs import ALIGN_TIMINGS_COLUMNS, read_timings
from kvscope.analysis.nsys.filters import parse_time_ns
from kvscope.commands.json_out import align_payload, json_line
from kvscope.io import write_parquet
from kvscope.schema import CLASS_ROOFLINE_FILE


def command(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    inputs = [(what, path) for what, path in (("export", ns.export), ("--timings folder", ns.timings),
                                              ("--classes file", ns.classes)) if path is not None]
    folder = output_folder(out, inputs)  # checked before the analysis; written whole or not at all
    start_ns = parse_time_ns(ns.start, "--start") if ns.start is not None else None
    end_ns = parse_time_ns(ns.end, "--end") if ns.end is not None else None
    split = None
    timings = read_timings(Path(ns.timings), ALIGN_TIMINGS_COLUMNS) if ns.timings else None  # once, for either path
    request = roofline_request(getattr(ns, "model", None), ns.dtype, ns.batch, ns.seq, ns.ctx, ns.ceilings,
                               run_dir=ns.timings)  # --model: absent unless given (SUPPRESS, as capacity's)
    if timings is not None and "rank" in timings:  # a tensor-parallel run: each rank on its own
        used = [f for f, v in (("--domain", ns.domain), ("--range", ns.range), ("--start", ns.start),
                               ("--end", ns.end), ("--pid", ns.pid), ("--classes", ns.classes)) if v is not None]
        refuse_rank_filters(used, ns.timings)
        result, split = analyse_ranks(Path(ns.export), timings, nsys=ns.nsys, phase_map=ns.phase_map)
    else:
        result = analyse(Path(ns.export), timings, nsys=ns.nsys, domain=ns.domain,
                         range_re=ns.range, start_ns=start_ns, end_ns=end_ns, pid=ns.pid, phase_map=ns.phase_map,
                         classes=Path(ns.classes) if ns.classes else None)
    facts, roof_note = None, None
    if split is None:
        facts, roof_note = roofline_facts(result, request)  # a foreign export without its shape: refused here
    elif request.args is not None:
        roof_note = f"skipped {CLASS_ROOFLINE_FILE}: a tensor-parallel run (each rank holds part of the model)"
    roof, roof_meta = None, None
    if facts is not None and result.steps is not None:  # roofline_facts gives facts only where there are steps
        roof, roof_meta = class_roofline(result.steps, result.kernels, facts), _facts_meta(facts, request)
    with folder as tmp:
        meta = {"command": " ".join(sys.argv), "timings": ns.timings}
        write(result, tmp, meta)
        if split is not None:
            write_ranks(split, tmp, meta)
        if roof is not None:
            write_parquet(roof, tmp / CLASS_ROOFLINE_FILE, {**meta, "class_roofline": roof_meta})
    print_align(result)
    if split is not None:
        Console().print(ranks_table(split[0]))
    if roof is not None:
        Console().print(class_roofline_table(roof))
    for note in (result.overlap_finding, result.skipped, roof_note):
        if note:
            print(f"align: {note}")
    tables = [*result.tables(), *([CLASS_ROOFLINE_FILE] if roof is not None else [])]
    others = sorted(p.name for p in out.iterdir() if p.name not in tables)  # trace.json
    print(f"align: {out} ({', '.join([*tables, *others])})")
    if getattr(ns, "json", False):
        print(json_line(align_payload(out, result.ranges, result.kernels)))
    return 0


def print_align(result: AlignResult) -> None:
    """The alignment's summary tables on stdout."""
    console = Console()
    for table in summary_tables(result):
        console.print(table)


def _facts_meta(facts: RooflineFacts, request: RooflineRequest) -> dict[str, Any]:
    """What class_roofline.parquet was computed from, for its metadata."""
    c = facts.ceilings
    return {"model": facts.args.name, "model_from": request.model_from, "ceilings_from": request.ceilings_from,
            "dtype": facts.dtype, "batch": facts.batch, "seq": facts.seq, "ctx": facts.ctx,
            "ceilings": None if c is None else {"gpu": c.gpu, "copy_gb_s": c.copy_gb_s, "bf16_tflop_s": c.bf16_tflop_s}}
