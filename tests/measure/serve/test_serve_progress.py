"""The served load's progress line (`kvscope.measure.serve.progress.Progress`): disabled, or on a stream that is not a
terminal, it prints nothing and builds nothing; forced, it draws the load's state; its text and fraction."""

from __future__ import annotations

import io

import pytest

from kvscope.measure.serve.progress import Progress


def _load(p: Progress) -> None:
    for i in range(50):
        p.update(i, 3, 1, i * 0.1)
    p.close()
    p.close()  # twice: nothing


@pytest.mark.parametrize("force", [False, True])
def test_disabled_prints_nothing(force: bool, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    p = Progress(100, 60.0, enabled=False, force=force, file=out)
    assert not p.active and p._bar is None  # nothing built
    _load(p)
    with Progress(None, None, enabled=False) as q:  # on stderr too
        _load(q)
    assert out.getvalue() == ""
    assert capsys.readouterr() == ("", "")


def test_enabled_but_not_a_terminal_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    p = Progress(100, None, enabled=True, file=out)
    assert not p.active
    _load(p)
    _load(Progress(100, None, enabled=True))  # pytest's captured stderr is no terminal either
    assert out.getvalue() == "" and capsys.readouterr() == ("", "")


def test_forced_draws_the_state() -> None:
    out = io.StringIO()
    with Progress(100, 60.0, enabled=True, force=True, file=out, refresh_s=0.0) as p:
        assert p.active
        p.update(12, 8, 3, 7.25)
    assert "serve: finished 12/100, running 8, waiting 3, 7.2 s/60 s" in out.getvalue()
    assert not p.active


def test_text_and_fraction() -> None:
    p = Progress(200, 10.0, enabled=False)
    assert p.fraction(50, 1.0) == 0.25 and p.fraction(10, 5.0) == 0.5 and p.fraction(500, 50.0) == 1.0
    assert Progress(None, None, enabled=False).fraction(3, 1.0) is None
    assert Progress(None, 30.0, enabled=False).describe(4, 1, 0, 2.0) == (
        "serve: finished 4, running 1, waiting 0, 2.0 s/30 s")
    assert Progress(10, None, enabled=False).describe(4, 1, 0, 2.0) == (
        "serve: finished 4/10, running 1, waiting 0, 2.0 s")
