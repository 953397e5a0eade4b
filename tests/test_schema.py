"""The shared names' one function: a sweep row's `oom` mark is a whole mark of its `flag`."""

from __future__ import annotations

import pandas as pd
import pytest

from kvscope.analysis.explain import not_oom
from kvscope.measure.sweep import collapse_flags
from kvscope.schema import is_oom


@pytest.mark.parametrize(("flag", "oom"), [("oom", True), ("oom;latency-collapse", True), (" oom ", True),
                                           ("zoom", False), ("bloom;", False), ("", False), (None, False),
                                           (float("nan"), False), ("latency-collapse", False)])
def test_oom_is_a_whole_mark(flag: object, oom: bool) -> None:
    assert is_oom(flag) is oom


def test_a_hand_written_zoom_is_a_measured_row() -> None:
    df = pd.DataFrame({"seq_len": [8, 16, 32], "batch": [1, 1, 1], "flag": ["zoom", "oom", ""],
                       "decode_p50_ms_per_tok": [1.0, float("nan"), 3.0],
                       "decode_tok_s": [1000.0, float("nan"), 300.0]})
    assert not_oom(df)["seq_len"].tolist() == [8, 32]
    # the third row is compared with the first (zoom: measured), not with the oom row
    assert collapse_flags(df, 2.0) == ["zoom", "oom", "latency-collapse"]
