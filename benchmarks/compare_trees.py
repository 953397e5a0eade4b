"""Two source trees of kvscope on one GPU, interleaved: did a change move the decode step or the prefill?

Each round runs `python3 -m kvscope run ARGS` once from every tree (A, then B, then A ... alternating which goes
first), each in a fresh process whose `PYTHONPATH` starts with that tree, and reads the run folder's summary: the
prefill's CUDA-event median (`prefill_p50_ms`) and the decode step's (`decode_p50_ms_per_tok`, the median over every
measured step). Per tree: the median of the rounds and their range; per round: B / A, and the median and range of
those paired ratios (the host drifts between rounds, less inside one). A ratio's range is the noise the comparison
can resolve: a change "equal within noise" has 1.0 inside it.

    python3 benchmarks/compare_trees.py --a .baseline --b . --rounds 5 --json $OUT/compare.json -- \\
        --model qwen2.5-3b --batch-size 1 --seq 512 --gen-tokens 64 --reps 5 --warmup 2

Torch-free itself (each run is a `kvscope run` process of its tree); the trees need not be importable together.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

METRICS = ("prefill_p50_ms", "decode_p50_ms_per_tok")


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree.resolve()), os.environ.get("PYTHONPATH", "")])}


def check_tree(tree: Path, cwd: Path) -> None:
    """The kvscope a process started as the runs are imports from `tree` (not from the working folder, not from an
    installed copy)."""
    done = subprocess.run([sys.executable, "-c", "import kvscope; print(kvscope.__file__)"], env=_env(tree), cwd=cwd,
                          capture_output=True, text=True, check=False)
    found = Path(done.stdout.strip()).resolve()
    if done.returncode != 0 or tree.resolve() not in found.parents:
        raise SystemExit(f"compare_trees: a process meant for {tree} imports kvscope from {found or done.stderr}")


def one_run(tree: Path, run_args: list[str], out: Path) -> dict[str, float]:
    """`kvscope run RUN_ARGS --out OUT` with `tree` first on PYTHONPATH, started in OUT's parent (`python3 -m`
    puts its working folder first on sys.path); the metrics of its summary."""
    cmd = [sys.executable, "-m", "kvscope", "run", *run_args, "--out", str(out)]
    done = subprocess.run(cmd, env=_env(tree), cwd=out.parent, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"compare_trees: {' '.join(cmd)} (tree {tree}) exited {done.returncode}: "
                         f"{done.stderr.strip().splitlines()[-1:] or ''}")
    row = pd.read_parquet(out / "summary.parquet").iloc[0]
    return {m: float(row[m]) for m in METRICS}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def interleaved(a: Path, b: Path, rounds: int, run_args: list[str]) -> list[dict[str, float]]:
    """Every round's figures of both trees (`a_<metric>`, `b_<metric>`), the order alternating between rounds."""
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as scratch:
        check_tree(a, Path(scratch))
        check_tree(b, Path(scratch))
        for r in range(rounds):
            order = [("a", a), ("b", b)] if r % 2 == 0 else [("b", b), ("a", a)]
            got = {name: one_run(tree, run_args, Path(scratch) / f"r{r}-{name}") for name, tree in order}
            rows.append({"round": r, **{f"{k}_{m}": v[m] for k, v in got.items() for m in METRICS}})
            print(json.dumps({"first": order[0][0], **rows[-1]}), flush=True)
    return rows


def spreads(rows: list[dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per metric: A's and B's medians and ranges over the rounds, and the paired ratios B / A."""
    out = {}
    for m in METRICS:
        ratios = [row[f"b_{m}"] / row[f"a_{m}"] for row in rows]
        out[m] = {"a": _spread([row[f"a_{m}"] for row in rows]), "b": _spread([row[f"b_{m}"] for row in rows]),
                  "b_over_a": _spread(ratios)}
    return out


def _shown(s: dict[str, float]) -> str:
    return f"{s['median']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    run_args = args[args.index("--") + 1:] if "--" in args else []
    mine = args[:args.index("--")] if "--" in args else args
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", type=Path, required=True, help="the first tree (the one holding kvscope/), e.g. the baseline")
    p.add_argument("--b", type=Path, required=True, help="the second tree, e.g. the change")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each runs both trees once (default 5)")
    p.add_argument("--json", type=Path, help="write the result here as JSON")
    ns = p.parse_args(mine)
    if ns.rounds < 1:
        p.error(f"--rounds must be >= 1, got {ns.rounds}")
    for tree in (ns.a, ns.b):
        if not (tree / "kvscope" / "__init__.py").is_file():
            p.error(f"{tree} holds no kvscope/ package")
    rows = interleaved(ns.a, ns.b, ns.rounds, run_args)
    summary = spreads(rows)
    for m, s in summary.items():
        print(f"{m}: A {_shown(s['a'])}  B {_shown(s['b'])}  B/A {_shown(s['b_over_a'])}")
    if ns.json:
        ns.json.write_text(json.dumps({"a": str(ns.a), "b": str(ns.b), "run_args": run_args, "rounds": rows,
                                       "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
