"""Exports of older nsys versions, made from a real 2025.3 export (tests/data/foreign/plain.sqlite) by the changes
the older schemas have (../shared/nsys-notes.md): the same analysis must come out.

- 2022: one kernel launch is two nested runtime rows with one correlation id (`cudaLaunchKernel` and
  `cudaLaunchKernel_v7000`);
- the export metadata table is `EXPORT_META_DATA` instead of `META_DATA_EXPORT`;
- range messages inline (`text`) instead of registered (`textId` into StringIds), and the other way round;
- columns that older exports lack (`endGlobalTid`, `callchainId`, the JSON payload columns).
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from paths import DATA

from kvscope.analysis.align.pipeline import AlignResult, analyse

PLAIN = DATA / "foreign" / "plain.sqlite"
RANGE_KEYS = ["range_id", "name", "domain", "style", "pid", "tid", "level", "parent_id", "start_ns", "end_ns",
              "gpu_start_ns", "gpu_end_ns", "gpu_busy_ns", "gpu_ops"]
KERNEL_KEYS = ["kind", "name", "start_ns", "end_ns", "stream", "pid", "corr", "range_id", "kernel_class"]


def _launches_doubled(db: sqlite3.Connection) -> None:
    """Each cudaLaunchKernel row gets a nested `_v7000` twin with the same correlation id, as in 2022 exports."""
    (name_id,) = db.execute("SELECT id FROM StringIds WHERE value LIKE 'cudaLaunchKernel%' LIMIT 1").fetchone()
    (value,) = db.execute("SELECT value FROM StringIds WHERE id = ?", (name_id,)).fetchone()
    new_id = db.execute("SELECT max(id) + 1 FROM StringIds").fetchone()[0]
    db.execute("INSERT INTO StringIds (id, value) VALUES (?, ?)", (new_id, value + "_v7000"))
    doubled = db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME (start, end, eventClass, globalTid, correlationId, "
                         "nameId, returnValue) SELECT start + 1, end - 1, eventClass, globalTid, correlationId, ?, "
                         "returnValue FROM CUPTI_ACTIVITY_KIND_RUNTIME WHERE nameId = ? AND end - start > 2",
                         (new_id, name_id)).rowcount
    assert doubled > 0


def _old_metadata_name(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE META_DATA_EXPORT RENAME TO EXPORT_META_DATA")


def _messages_inline(db: sqlite3.Connection) -> None:
    changed = db.execute("UPDATE NVTX_EVENTS SET text = (SELECT value FROM StringIds WHERE id = textId), "
                         "textId = NULL WHERE textId IS NOT NULL AND eventType IN (59, 60)").rowcount
    assert changed > 0


def _messages_registered(db: sqlite3.Connection) -> None:
    first = db.execute("SELECT max(id) + 1 FROM StringIds").fetchone()[0]
    rows = db.execute("SELECT rowid, text FROM NVTX_EVENTS WHERE text IS NOT NULL AND eventType IN (59, 60)").fetchall()
    assert rows
    for k, (rowid, text) in enumerate(rows):
        db.execute("INSERT INTO StringIds (id, value) VALUES (?, ?)", (first + k, text))
        db.execute("UPDATE NVTX_EVENTS SET text = NULL, textId = ? WHERE rowid = ?", (first + k, rowid))


def _old_columns(db: sqlite3.Connection) -> None:
    for table, column in (("NVTX_EVENTS", "endGlobalTid"), ("NVTX_EVENTS", "jsonText"), ("NVTX_EVENTS", "jsonTextId"),
                          ("NVTX_EVENTS", "binaryData"), ("CUPTI_ACTIVITY_KIND_RUNTIME", "callchainId")):
        db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")


VARIANTS: dict[str, Callable[[sqlite3.Connection], None]] = {
    "2022 doubled launches": _launches_doubled, "EXPORT_META_DATA": _old_metadata_name,
    "inline messages": _messages_inline, "registered messages": _messages_registered,
    "older columns": _old_columns,
}


def _sorted(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return df[keys].sort_values(keys[:5] if keys[0] == "range_id" else ["start_ns", "corr"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference() -> AlignResult:
    return analyse(PLAIN)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_older_schemas_give_the_same_analysis(variant: str, reference: AlignResult, tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    shutil.copy(PLAIN, path)
    with sqlite3.connect(path) as db:
        VARIANTS[variant](db)
    got = analyse(path)
    pd.testing.assert_frame_equal(_sorted(got.ranges, RANGE_KEYS), _sorted(reference.ranges, RANGE_KEYS),
                                  check_dtype=False, check_categorical=False)
    pd.testing.assert_frame_equal(_sorted(got.kernels, KERNEL_KEYS), _sorted(reference.kernels, KERNEL_KEYS),
                                  check_dtype=False, check_categorical=False)
    assert len(got.kernels) == 30 and int(got.ranges["gpu_ops"].sum()) == int(reference.ranges["gpu_ops"].sum())
