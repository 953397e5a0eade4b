"""`kvscope align`'s filters and the API's equivalents (issue 22, cause 4).

A filter that keeps none of the export's ranges is an error (exit code 2, a KvscopeError) that says which filter
matched nothing and what the export holds (its domains, processes, time span; names for `--range`), never empty
tables with exit code 0. The filters', the phase map's and the classes' arguments are checked by the analysis
(`RangeFilter`, `parse_phase_map`, `resolve_rules`), so the command, `analyse` and `kvscope.api.align` refuse the
same values with the same messages, types included.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_checks import fail
from paths import DATA

import kvscope.analysis.align.kernel_classes as kc
import kvscope.api as api
from kvscope.analysis.align.phase_map import parse_phase_map
from kvscope.analysis.align.pipeline import analyse
from kvscope.analysis.nsys.filters import RangeFilter
from kvscope.errors import KvscopeError

TINY = DATA / "nsys" / "tiny.sqlite"
TINY_DIR = DATA / "nsys" / "tiny.parquetdir"
PLAIN = DATA / "foreign" / "plain.sqlite"
MULTI = DATA / "foreign" / "multiproc.sqlite"
NOKERNELS = DATA / "foreign" / "nokernels.sqlite"

TINY_HOLDS = "the export's 165 ranges: domains 'kvscope'; processes 517; from 17994917 to 51733195 ns"
PLAIN_HOLDS = ("the export's 8 ranges: domains '' (the default), 'myengine'; processes 871; from 4212055063 to "
               "4400528615 ns")
MULTI_HOLDS = "the export's 5 ranges: domains '' (the default); processes 1093, 1094; from 6790217712 to 7220068946 ns"
NOKERNELS_HOLDS = ("the export's 3 ranges: domains '' (the default); processes 968; from 3562861891 to 3565482910 "
                   "ns")

# (export, command-line flags, API keywords, message after "<export>: ")
NOTHING = [
    (TINY, ["--domain", "nope"], {"domain": "nope"}, f"no NVTX range matches --domain 'nope' ({TINY_HOLDS})"),
    (TINY, ["--domain="], {"domain": ""}, f"no NVTX range matches --domain '' ({TINY_HOLDS})"),
    (TINY_DIR, ["--domain", "KVSCOPE"], {"domain": "KVSCOPE"},
     f"no NVTX range matches --domain 'KVSCOPE' ({TINY_HOLDS})"),
    (TINY, ["--range", "^zzz"], {"range_re": "^zzz"},
     f"no NVTX range matches --range '^zzz' ({TINY_HOLDS}; 27 names, such as 'run bs=1 seq=32 gen=4', 'rep 0', "
     "'prefill')"),
    (TINY, ["--pid", "99"], {"pid": 99}, f"no NVTX range matches --pid 99 ({TINY_HOLDS})"),
    (TINY, ["--pid", str(2**40)], {"pid": 2**40}, f"no NVTX range matches --pid {2**40} ({TINY_HOLDS})"),
    (TINY, ["--start", "99999999999999"], {"start_ns": 99999999999999},
     f"no NVTX range matches --start 99999999999999 ns ({TINY_HOLDS})"),
    (TINY, ["--start", "1.5s"], {"start_ns": 1_500_000_000},
     f"no NVTX range matches --start 1500000000 ns ({TINY_HOLDS})"),
    (TINY, ["--end", "0"], {"end_ns": 0}, f"no NVTX range matches --end 0 ns ({TINY_HOLDS})"),
    (TINY, ["--domain", "nope", "--pid", "99"], {"domain": "nope", "pid": 99},
     f"no NVTX range matches --domain 'nope', nor --pid 99 ({TINY_HOLDS})"),
    (TINY, ["--domain", "kvscope", "--pid", "1"], {"domain": "kvscope", "pid": 1},
     f"no NVTX range matches --pid 1 ({TINY_HOLDS})"),
    (PLAIN, ["--domain", "myengine", "--range", "^main"], {"domain": "myengine", "range_re": "^main"},
     f"no NVTX range matches --domain 'myengine' and --range '^main' together (each matches some alone; "
     f"{PLAIN_HOLDS}; 8 names, such as 'main', 'main iter 0', 'main iter 1')"),
    (PLAIN, ["--start", "4212055063", "--end", "4212055062"], None,
     "--end (4212055062 ns) is before --start (4212055063 ns)"),
    (MULTI, ["--pid", "1093", "--start", "7100000000"], {"pid": 1093, "start_ns": 7_100_000_000},
     f"no NVTX range matches --start 7100000000 ns and --pid 1093 together (each matches some alone; {MULTI_HOLDS})"),
    (MULTI, ["--pid", "1095"], {"pid": 1095}, f"no NVTX range matches --pid 1095 ({MULTI_HOLDS})"),
    (NOKERNELS, ["--end", "3000000000"], {"end_ns": 3_000_000_000},
     f"no NVTX range matches --end 3000000000 ns ({NOKERNELS_HOLDS})"),
]


def _cli(export: Path, flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    out = tmp_path / "out"
    line = fail(["align", str(export), "--out", str(out), *flags], capsys)
    assert not out.exists()
    return line.removeprefix("kvscope: error: ")


def _raised(fn, *args, **kwargs) -> str:
    with pytest.raises(KvscopeError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(("export", "flags", "kwargs", "message"), NOTHING)
def test_a_filter_that_matches_nothing_is_an_error(export: Path, flags: list[str], kwargs: dict | None,
                                                   message: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    shown = message if kwargs is None else f"{export}: {message}"
    assert _cli(export, flags, tmp_path, capsys) == shown
    if kwargs is not None:
        assert _raised(analyse, export, **kwargs) == shown
        assert _raised(api.align, export, **kwargs) == shown
        assert _raised(api.align, api.load_export(export), **kwargs) == f"{export}: {message}"


def test_filters_that_match_still_align(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The checks refuse nothing that matches: a range outside the GPU work, the default domain, a window
    touching one range's last nanosecond."""
    assert len(analyse(PLAIN, domain="").ranges) == 7
    assert analyse(PLAIN, start_ns=4400528615).ranges["range_id"].tolist() == [1]  # main ends there
    assert len(analyse(NOKERNELS, range_re="host step 2").ranges) == 1
    assert len(analyse(MULTI, pid=1093, end_ns=6790217712).ranges) == 1
    assert main_ok(["align", str(TINY), "--domain", "kvscope", "--pid", "517", "--out", str(tmp_path / "o")], capsys)


def main_ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> bool:
    from kvscope.cli import main

    rc = main(argv)
    capsys.readouterr()
    return rc == 0


# ---- argument checks: the analysis', with the command's messages ------------------------------------------------
BAD_FILTERS = [
    ({"domain": 5}, "--domain must be text (an NVTX domain's name), got int 5"),
    ({"domain": b"kvscope"}, "--domain must be text (an NVTX domain's name), got bytes b'kvscope'"),
    ({"range_re": 5}, "--range must be text (a regular expression), got int 5"),
    ({"range_re": b"x"}, "--range must be text (a regular expression), got bytes b'x'"),
    ({"range_re": "("}, "--range: '(' is not a regular expression (missing ), unterminated subpattern at position 0)"),
    ({"start_ns": -1}, "--start must be a non-negative integer, got -1"),
    ({"start_ns": 1.5}, "--start must be a non-negative integer, got 1.5"),
    ({"start_ns": "1.5s"}, "--start must be a non-negative integer, got '1.5s'"),
    ({"start_ns": True}, "--start must be a non-negative integer, got True"),
    ({"start_ns": 2**63}, f"--start {2**63} is beyond any export's clock (over 2**63 ns)"),
    ({"end_ns": 2**64}, f"--end {2**64} is beyond any export's clock (over 2**63 ns)"),
    ({"pid": 2**63}, f"--pid {2**63} does not fit in 64 bits"),
    ({"pid": -3}, "--pid must be a non-negative integer, got -3"),
    ({"start_ns": 10, "end_ns": 5}, "--end (5 ns) is before --start (10 ns)"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_FILTERS)
def test_filter_arguments_are_checked(kwargs: dict, message: str) -> None:
    names = {"range_re": "range_re", "start_ns": "start_ns", "end_ns": "end_ns"}
    assert _raised(RangeFilter, **{names.get(k, k): v for k, v in kwargs.items()}) == message
    assert _raised(analyse, TINY, **kwargs) == message
    with pytest.raises(KvscopeError):  # the API's own checks may come first, in one line too
        api.align(TINY, **kwargs)


def test_cli_filter_values_beyond_64_bits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(TINY, ["--start", str(2**63)], tmp_path, capsys) == (
        f"--start '{2**63}' is beyond any export's clock (over 2**63 ns)")
    assert _cli(TINY, ["--end", f"{2**63 // 10**9 + 1}s"], tmp_path, capsys) == (
        f"--end '{2**63 // 10**9 + 1}s' is beyond any export's clock (over 2**63 ns)")


BAD_PHASE_MAPS = [
    (5, "--phase-map must be KEY=RE,... (text) or a mapping of key to regular expression, got int 5"),
    (["prefill=x"], "--phase-map must be KEY=RE,... (text) or a mapping of key to regular expression, got list "
                    "['prefill=x']"),
    (b"prefill=x", "--phase-map must be KEY=RE,... (text) or a mapping of key to regular expression, got bytes "
                   "b'prefill=x'"),
    ({"prefill": 5}, "--phase-map: prefill= must be a regular expression (text), got int 5"),
    ({"decode": None}, "--phase-map: decode= must be a regular expression (text), got NoneType None"),
    ({"decode": b"^gen"}, "--phase-map: decode= must be a regular expression (text), got bytes b'^gen'"),
    ({1: "x"}, "--phase-map: unknown key 1 (keys: prefill, decode, step, layer)"),
    ({}, "--phase-map needs at least one of prefill=RE, decode=RE, step=RE, layer=RE"),
]


@pytest.mark.parametrize(("value", "message"), BAD_PHASE_MAPS)
def test_phase_map_arguments_are_checked(value: object, message: str) -> None:
    assert _raised(parse_phase_map, value) == message
    assert _raised(analyse, PLAIN, phase_map=value) == message
    with pytest.raises(KvscopeError):
        api.align(PLAIN, phase_map=value)


BAD_CLASSES = [
    (5, "--classes must be a rules file (a path) or loaded rules (kernel_classes.load_rules), got int 5"),
    (b"rules.toml", "--classes must be a rules file (a path) or loaded rules (kernel_classes.load_rules), got bytes "
                    "b'rules.toml'"),
    ([("gemm", "x")], "--classes must be a rules file (a path) or loaded rules (kernel_classes.load_rules), got list "
                      "[('gemm', 'x')]"),
]


@pytest.mark.parametrize(("value", "message"), BAD_CLASSES)
def test_classes_arguments_are_checked(value: object, message: str) -> None:
    assert _raised(kc.resolve_rules, value) == message
    assert _raised(analyse, TINY, classes=value) == message
    with pytest.raises(KvscopeError):
        api.align(TINY, classes=value)


def test_classes_that_are_fine(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nclass = "attention"\npattern = "gemv"\n')
    assert kc.resolve_rules(None) is None
    assert kc.resolve_rules(kc.BUILTIN_RULES) is kc.BUILTIN_RULES
    for given in (rules, str(rules)):
        loaded = kc.resolve_rules(given)
        assert loaded is not None and loaded.rules[0].pattern == "gemv"
    assert analyse(TINY, classes=str(rules)).kernels["kernel_class"].value_counts().get("attention", 0) > 0
