"""Kernel classes: the built-in rule table on real kernel names (tests/data/kernel_names.tsv), user rule files
(overrides and errors) and the speed of classifying a million kernels."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from paths import DATA

from kvscope.analysis.align.kernel_classes import (
    BUILTIN_RULES,
    CLASSES,
    KERNEL_CLASS_RULES,
    classify,
    classify_name,
    load_rules,
)
from kvscope.errors import KvscopeError

NAMES_FILE = DATA / "kernel_names.tsv"
MIN_REAL_NAMES = 60
# 1M kernels of about 2k distinct names must take well under a second
MILLION_KERNELS = 1_000_000
DISTINCT_NAMES = 2_000
CLASSIFY_LIMIT_S = 1.0


def _names() -> pd.DataFrame:
    return pd.read_csv(NAMES_FILE, sep="\t", comment="#", dtype=str, keep_default_na=False, quoting=3)


NAMES = _names()


def test_names_file_is_real_and_complete() -> None:
    assert list(NAMES.columns) == ["name", "kernel_class", "source"]
    assert NAMES["name"].is_unique and len(NAMES) >= MIN_REAL_NAMES
    assert (NAMES["source"].str.len() > 0).all()
    assert set(NAMES["kernel_class"]) == set(CLASSES)  # every class is exercised, and nothing else


@pytest.mark.parametrize(("name", "cls"), list(zip(NAMES["name"], NAMES["kernel_class"], strict=True)),
                         ids=[f"{i}-{n[:40]}" for i, n in enumerate(NAMES["name"])])
def test_real_kernel_name(name: str, cls: str) -> None:
    assert classify_name(name) == cls


def test_vectorised_equals_one_by_one() -> None:
    got = classify(NAMES["name"])
    assert isinstance(got.dtype, pd.CategoricalDtype) and tuple(got.cat.categories) == CLASSES
    assert got.astype(str).tolist() == NAMES["kernel_class"].tolist()


def test_flashinfer_prefill_is_not_a_fill() -> None:
    # "Prefill" holds "fill": it was copy/memset before the rules were rewritten
    for name in ("BatchPrefillWithPagedKVCacheKernel", "void flashinfer::BatchPrefillWithPagedKVCacheKernel<"
                 "flashinfer::KernelTraits<(flashinfer::MaskMode)1, 128u, 2u, 4u, 8u, 8u, 1u, 4u, "
                 "(flashinfer::PosEncodingMode)0, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16, float, int>>",
                 "SinglePrefillWithKVCacheKernel"):
        assert classify_name(name) == "attention", name
    assert classify_name("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") == \
        "copy/memset"


def test_rule_table_is_well_formed() -> None:
    assert len(KERNEL_CLASS_RULES) == len(BUILTIN_RULES.rules)
    for cls, pattern, note in KERNEL_CLASS_RULES:
        assert cls in CLASSES and note
        re.compile(pattern)
    table = BUILTIN_RULES.table()
    assert list(table.columns) == ["order", "kernel_class", "pattern", "note", "origin"]
    assert (table["origin"] == "built-in").all() and table["order"].tolist() == list(range(1, len(table) + 1))


def test_builtin_patterns_are_lowercase_and_case_insensitive() -> None:
    # lowercase patterns run case-sensitively on lowercased names (fast); that must equal re.IGNORECASE on the names
    names = NAMES["name"].tolist() + [n.upper() for n in NAMES["name"]]
    for _, pattern, _ in KERNEL_CLASS_RULES:
        assert pattern == pattern.lower(), pattern
        slow, fast = re.compile(pattern, re.IGNORECASE), re.compile(pattern)
        assert [bool(slow.search(n)) for n in names] == [bool(fast.search(n.lower())) for n in names], pattern
    assert classify(pd.Series([n.upper() for n in NAMES["name"]])).astype(str).tolist() == \
        NAMES["kernel_class"].tolist()


def test_classify_keeps_index_and_missing_names_are_other() -> None:
    names = pd.Series(["nvjet_sm90_tst_64x8_64x16_2x4_h_bz_TNT", None, "", "[CUDA memset]", "NCCLDEVKERNEL_SENDRECV"],
                      index=[10, 20, 30, 40, 50], dtype="string")
    got = classify(names)
    assert got.index.tolist() == [10, 20, 30, 40, 50]
    assert got.astype(str).tolist() == ["gemm", "other", "other", "copy/memset", "communication"]
    assert len(classify(pd.Series([], dtype="string"))) == 0


def test_older_call_with_kinds_still_works() -> None:
    kind = pd.Series(["kernel", "memcpy", "memset", "graph"], dtype="string")
    name = pd.Series(["flash_fwd_kernel", "[CUDA memcpy]", "[CUDA memset]", "[CUDA graph]"], dtype="string")
    assert classify(kind, name).astype(str).tolist() == ["attention", "copy/memset", "copy/memset", "other"]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_user_rules_come_first(tmp_path: Path) -> None:
    p = _write(tmp_path, "classes.toml", """
[[rule]]
class = "attention"
pattern = "my_paged_attn"
note = "our paged attention"

[[rule]]
class = "other"
pattern = "^nvjet_sm90_tst_64x8"

[[rule]]
class = "gemm"
pattern = "MY_W4A16"
""")
    rules = load_rules(p)
    names = pd.Series(["void my_paged_attn_kernel<128>", "nvjet_sm90_tst_64x8_64x16_2x4_h_bz_TNT",
                       "nvjet_sm90_tst_128x8_64x12_4x1_v_bz_TNT", "my_w4a16_fill_kernel", "rms_norm_kernel",
                       "MY_PAGED_ATTN_V2"])
    # case-insensitive both ways: a lowercase pattern on a capitalised name, a capitalised pattern on a lowercase one
    assert classify(names, rules).astype(str).tolist() == ["attention", "other", "gemm", "gemm", "norm", "attention"]
    assert classify_name("my_w4a16_fill_kernel") == "copy/memset"  # the built-ins alone are unchanged
    table = rules.table()
    assert table["origin"].tolist()[:3] == [f"{p} rule 1", f"{p} rule 2", f"{p} rule 3"]
    assert table["note"].tolist()[:3] == ["our paged attention", "user rule", "user rule"]
    assert len(table) == 3 + len(KERNEL_CLASS_RULES)


def test_user_rules_json(tmp_path: Path) -> None:
    p = _write(tmp_path, "classes.json", json.dumps({"rule": [
        {"class": "communication", "pattern": "my_allgather_v\\d"},
        {"class": "copy/memset", "pattern": "flash_fwd_kernel"},
    ]}))
    names = pd.Series(["my_allgather_v2", "flash_fwd_kernel", "flash_fwd_splitkv_kernel"])
    assert classify(names, load_rules(p)).astype(str).tolist() == ["communication", "copy/memset", "attention"]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("bad.toml", "[[rule]\nclass = 'gemm'", "{p}: not valid TOML ("),
    ("bad.json", "{\"rule\": [", "{p}: not valid JSON ("),
    ("table.toml", "[rule]\nclass = 'gemm'\npattern = 'x'", "{p}: 'rule' must be a list of tables"),
    ("none.toml", "title = 'x'", "{p}: no rules: expected [[rule]] tables"),
    ("extra.toml", "title = 'x'\n[[rule]]\nclass = 'gemm'\npattern = 'x'", "{p}: unknown top-level key(s) title"),
    ("empty.json", "{\"rule\": []}", "{p}: 'rule' holds no rules"),
    ("list.json", "[{\"class\": \"gemm\", \"pattern\": \"x\"}]", "{p}: no rules: expected [[rule]] tables"),
    ("class.toml", "[[rule]]\nclass = 'gemm'\npattern = 'a'\n[[rule]]\nclass = 'attn'\npattern = 'x'",
     "{p}: rule 2: unknown class 'attn' (classes: gemm, attention, norm, elementwise, copy/memset, communication, "
     "other)"),
    ("regex.toml", "[[rule]]\nclass = 'gemm'\npattern = 'my_(gemm'", "{p}: rule 1: bad regex 'my_(gemm' ("),
    ("nopattern.toml", "[[rule]]\nclass = 'gemm'", "{p}: rule 1: lacks 'pattern'"),
    ("noclass.json", "{\"rule\": [{\"pattern\": \"x\"}]}", "{p}: rule 1: lacks 'class'"),
    ("emptypattern.toml", "[[rule]]\nclass = 'gemm'\npattern = ''", "{p}: rule 1: pattern must be a non-empty string"),
    ("numpattern.json", "{\"rule\": [{\"class\": \"gemm\", \"pattern\": 3}]}",
     "{p}: rule 1: pattern must be a non-empty string, got 3"),
    ("key.toml", "[[rule]]\nclass = 'gemm'\npattern = 'x'\npatern = 'y'", "{p}: rule 1: unknown key(s) patern"),
    ("entry.json", "{\"rule\": [\"gemm\"]}", "{p}: rule 1: expected a table with class and pattern, got str"),
    ("note.json", "{\"rule\": [{\"class\": \"gemm\", \"pattern\": \"x\", \"note\": 1}]}",
     "{p}: rule 1: note must be a string"),
])
def test_bad_rule_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    p = _write(tmp_path, name, text)
    with pytest.raises(KvscopeError) as err:
        load_rules(p)
    shown = str(err.value)
    assert shown.startswith(message.format(p=p)), shown
    assert "\n" not in shown


def test_missing_and_binary_rule_files(tmp_path: Path) -> None:
    with pytest.raises(KvscopeError, match=r"nope\.toml: cannot read the kernel-class rules \(No such file"):
        load_rules(tmp_path / "nope.toml")
    with pytest.raises(KvscopeError, match=r"cannot read the kernel-class rules"):
        load_rules(tmp_path)
    p = tmp_path / "bin.toml"
    p.write_bytes(b"\xff\xfe\x00rule")
    with pytest.raises(KvscopeError, match=r"bin\.toml: kernel-class rules are not UTF-8 text"):
        load_rules(p)


def test_a_million_kernels_in_well_under_a_second() -> None:
    rng = np.random.default_rng(14)
    base = NAMES["name"].to_numpy()
    # ~2k distinct names: the real ones, and variants of them as template arguments make them in real traces
    distinct = np.array([f"{base[i % len(base)]}<{i}>" if i >= len(base) else base[i] for i in range(DISTINCT_NAMES)],
                        dtype=object)
    names = pd.Series(distinct[rng.integers(0, DISTINCT_NAMES, MILLION_KERNELS)], dtype="string")
    classify(names.iloc[:1000])  # compile the patterns' caches out of the timing
    t0 = time.perf_counter()
    got = classify(names)
    elapsed_s = time.perf_counter() - t0
    assert len(got) == MILLION_KERNELS and got.notna().all()
    assert elapsed_s < CLASSIFY_LIMIT_S, f"classify took {elapsed_s:.3f} s for {MILLION_KERNELS:,} kernels"
