"""CPU side of kvscope's CUDA kernels: the torch references against the engine's own torch path, the checks at
the kernel boundary, the `--kernels` switch, and the timestamp protocol of a captured graph (with a stand-in for
the kernels that write the timestamps)."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from kvscope.cli import main
from kvscope.engine import plan
from kvscope.engine.plan import use_kernels
from kvscope.errors import KvscopeError
from kvscope.kernels import rms_norm as k_rms_norm
from kvscope.kernels import rope_kv as k_rope_kv
from kvscope.kernels import silu_mul as k_silu_mul
from kvscope.kernels import stamp as k_stamp
from kvscope.model.config import PRESETS
from kvscope.model.layers import apply_rope, rope_tables
from kvscope.profiler.instrument import GraphTimer, Instrument, RegionRecord

CPU = torch.device("cpu")


def test_rope_kv_reference_matches_the_engine_torch_path() -> None:
    """Prefill (positions 0..S-1) and a decode step at ragged positions: rotated q and k in place, k and v in the
    cache at the right positions, other cache positions untouched."""
    args = PRESETS["tiny"]
    h, hkv, d = args.n_heads, args.n_kv_heads, args.head_dim
    cos, sin_rot = rope_tables(args, 32, CPU, torch.float32)
    g = torch.Generator().manual_seed(0)
    for b, s, lengths in ((2, 5, None), (3, 1, torch.tensor([4, 9, 0]))):
        qkv = torch.randn(b, s, h + 2 * hkv, d, generator=g)
        k_cache, v_cache = torch.full((b, 32, hkv, d), 7.0), torch.full((b, 32, hkv, d), 7.0)
        ref = qkv.clone()
        k_rope_kv.rope_kv_ref_(qkv, cos, sin_rot, k_cache, v_cache, h, lengths)
        start = torch.zeros(b, dtype=torch.int64) if lengths is None else lengths
        pos = start.view(b, 1) + torch.arange(s).view(1, s)  # (B, S)
        rotated = apply_rope(ref[:, :, :h + hkv], cos[pos].unsqueeze(2), sin_rot[pos].unsqueeze(2))
        assert torch.equal(qkv[:, :, :h + hkv], rotated)
        assert torch.equal(qkv[:, :, h + hkv:], ref[:, :, h + hkv:])  # values untouched in the projection
        written = torch.zeros(b, 32, dtype=torch.bool)
        for bi in range(b):
            for si in range(s):
                p = int(pos[bi, si])
                written[bi, p] = True
                assert torch.equal(k_cache[bi, p], rotated[bi, si, h:])
                assert torch.equal(v_cache[bi, p], ref[bi, si, h + hkv:])
        assert (k_cache[~written] == 7).all() and (v_cache[~written] == 7).all()


def test_rms_norm_and_silu_mul_references() -> None:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 64, generator=g), torch.rand(64, generator=g) + 0.5
    torch.testing.assert_close(k_rms_norm.rms_norm_ref(x, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6))
    xb, wb = x.bfloat16(), w.bfloat16()
    # bf16: the normalised row is rounded once before the weight multiplies it, as transformers does
    xf = xb.float()
    expect = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * wb
    assert torch.equal(k_rms_norm.rms_norm_ref(xb, wb, 1e-6), expect)
    gate, up = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    torch.testing.assert_close(k_silu_mul.silu_mul_ref(gate, up), gate * torch.sigmoid(gate) * up)


@pytest.mark.parametrize("call", [
    lambda: k_rms_norm.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6),
    lambda: k_silu_mul.silu_mul(torch.ones(2, 8), torch.ones(2, 8)),
    lambda: k_rope_kv.rope_kv_(torch.ones(1, 1, 4, 8), torch.ones(4, 8), torch.ones(4, 8), torch.ones(1, 4, 1, 8),
                               torch.ones(1, 4, 1, 8), 2),
    lambda: k_stamp.stamp(torch.zeros(1, dtype=torch.int64)),
])
def test_kernel_calls_refuse_cpu_tensors(call) -> None:
    with pytest.raises(ValueError, match="CUDA"):
        call()


def test_kernel_boundary_checks_name_the_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shape checks run before any launch; the device check is bypassed here to reach them on the CPU."""
    for module in (k_rms_norm, k_silu_mul, k_rope_kv):
        monkeypatch.setattr(module, "need_cuda", lambda *a: None)
    with pytest.raises(ValueError, match=r"weight \(7,\).*\(8,\) for x \(2, 8\)"):
        k_rms_norm.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match=r"gate \(2, 8\).*up \(2, 4\)"):
        k_silu_mul.silu_mul(torch.ones(2, 8), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"qkv \(1, 1, 5, 8\) does not split into 2 query heads"):
        k_rope_kv.rope_kv_(torch.ones(1, 1, 5, 8), torch.ones(4, 8), torch.ones(4, 8), torch.ones(1, 4, 1, 8),
                           torch.ones(1, 4, 1, 8), 2)
    with pytest.raises(ValueError, match=r"caches k \(1, 4, 2, 8\)"):
        k_rope_kv.rope_kv_(torch.ones(1, 1, 4, 8), torch.ones(4, 8), torch.ones(4, 8), torch.ones(1, 4, 2, 8),
                           torch.ones(1, 4, 2, 8), 2)
    with pytest.raises(ValueError, match=r"tables cos \(3, 8\)"):
        k_rope_kv.rope_kv_(torch.ones(1, 1, 4, 8), torch.ones(3, 8), torch.ones(3, 8), torch.ones(1, 4, 1, 8),
                           torch.ones(1, 4, 1, 8), 2)
    with pytest.raises(ValueError, match=r"lengths must be int64 \(1,\)"):
        k_rope_kv.rope_kv_(torch.ones(1, 1, 4, 8), torch.ones(4, 8), torch.ones(4, 8), torch.ones(1, 4, 1, 8),
                           torch.ones(1, 4, 1, 8), 2, lengths=torch.zeros(1, dtype=torch.int32))


def test_kernels_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(plan, "kernels_unavailable", lambda: None)  # CuPy present (test_loader.py: absent)
    assert use_kernels(None, cuda, torch.bfloat16) is True
    assert use_kernels(None, CPU, torch.float32) is False
    assert use_kernels(False, cuda, torch.bfloat16) is False
    with pytest.raises(KvscopeError, match="--kernels on needs a CUDA device"):
        use_kernels(True, CPU, torch.float32)
    with pytest.raises(KvscopeError, match="--kernels on needs a CUDA device and float32/bfloat16/float16"):
        use_kernels(None, cuda, torch.float64)


def test_kernels_on_need_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan, "kernels_unavailable", lambda: "ModuleNotFoundError: No module named 'cupy'")
    with pytest.raises(KvscopeError, match=r"--kernels on needs CuPy.*--kernels off"):
        use_kernels(True, torch.device("cuda"), torch.bfloat16)
    assert use_kernels(False, torch.device("cuda"), torch.bfloat16) is False


def test_kernels_on_without_cuda_is_a_one_line_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny", "--device", "cpu", "--kernels", "on", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kernels on needs a CUDA device" in err[0]
    assert not out.exists()


def _capture_step(ins: Instrument, n_layers: int, clock: itertools.count, kernel_writes: list[int]) -> GraphTimer:
    """The engine's decode step as the instrument sees it during capture, with kernels on: every layer (and the
    lm_head) opens with an RMSNorm kernel that takes the pending timestamp; the post-attention norm too."""
    stamps = torch.full((Instrument.graph_marks_bound(n_layers, 7),), -1, dtype=torch.int64)

    def norm_kernel() -> None:
        slot = ins.take_stamp()
        if slot is not None:
            slot.fill_(next(clock))
            kernel_writes.append(slot.data_ptr())

    with ins.capturing(stamps) as timer:
        with ins.region("embed", "layer", chain=True):
            pass
        for i in range(n_layers):
            with ins.region_with(f"L{i}", "layer", {"layer": i, "chain": True, "stamped": True}):
                for op in ("norm", "qkv", "rope", "attn", "o_proj", "mlp"):
                    keys = {"layer": i, "op": op, "chain": True, **({"stamped": True} if op == "norm" else {})}
                    with ins.region_with(f"L{i}.{op}", "op", keys):
                        if op in ("norm", "mlp"):
                            norm_kernel()
        with ins.region("lm_head", "layer", chain=True, stamped=True):
            norm_kernel()
        with ins.region("sample", "layer", chain=True):
            pass
    return timer


@pytest.mark.parametrize("granularity", ["layer", "op"])
def test_graph_timestamps_are_written_by_the_norm_kernels(monkeypatch: pytest.MonkeyPatch, granularity: str) -> None:
    """Layer granularity: the RMSNorm kernels write every layer boundary and the lm_head's start; one-thread stamp
    kernels only the embed start, the lm_head/sample boundary and the sample end. Op granularity: norm ops share
    their layer's timestamp; every other op boundary is a stamp kernel. Every mark gets a timestamp."""
    clock = itertools.count(100)
    standalone: list[int] = []

    def fake_stamp(slot: torch.Tensor) -> None:
        slot.fill_(next(clock))
        standalone.append(slot.data_ptr())

    monkeypatch.setattr(k_stamp, "stamp", fake_stamp)
    ins = Instrument(granularity, "cpu", nvtx=False)
    kernel_writes: list[int] = []
    timer = _capture_step(ins, 3, clock, kernel_writes)
    assert timer.pending is None
    slots = {r.start for r in timer.marks} | {r.end for r in timer.marks}
    assert all(int(timer.stamps[s]) >= 100 for s in slots)  # every mark was written
    assert len(slots) == timer.used  # no slot handed out without a mark
    m = {r.name: r for r in timer.marks}
    assert m["L0"].start == m["embed"].end and m["L1"].start == m["L0"].end and m["lm_head"].start == m["L2"].end
    if granularity == "layer":
        assert [r.name for r in timer.marks] == ["embed", "L0", "L1", "L2", "lm_head", "sample"]
        assert len(standalone) == 3 and len(kernel_writes) == 3 + 1
        assert timer.used == 7
    else:
        assert m["L1.norm"].start == m["L1"].start  # one timestamp, written by the norm kernel
        assert m["L0.qkv"].start == m["L0.norm"].end
        # per layer: norm start (kernel), then the ends of norm, qkv, rope, attn, o_proj (stamp kernels); the mlp's
        # end is the next layer's start (kernel); the mlp's own post-attention norm takes no timestamp
        assert len(kernel_writes) == 3 + 1
        assert len(standalone) == 1 + 3 * 5 + 2
    starts = [int(timer.stamps[r.start]) for r in timer.marks if r.level == "layer"]
    assert starts == sorted(starts)


def test_graph_timestamps_resolve_on_the_step_anchor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of a stamped graph: durations from the timestamps (ns), start offsets from the step's start event,
    the graph's first timestamp taken as that instant."""
    from fakes import FakeEvent

    clock = itertools.count(0, 250_000)  # every timestamp 0.25 ms after the previous one
    monkeypatch.setattr(k_stamp, "stamp", lambda slot: slot.fill_(next(clock)))
    ins = Instrument("layer", "cpu", nvtx=False)
    timer = _capture_step(ins, 2, clock, [])
    timer.done = type("Done", (), {"record": lambda self: None})()
    ins.start_clock()
    ins._clock.origin_event = FakeEvent(0.0)
    with ins.region("rep 0", "rep", rep=0), ins.region("decode step 5", "step", phase="decode", step=5):
        ins.replayed(timer)
    (_, where), = ins._graphs.pending.values()
    assert where.anchor.name == "decode step 5"  # the step region the replay ran in
    where.anchor = RegionRecord("decode step 5", "step", 0, "decode", 5, None, None, None, None, 0,
                                start=FakeEvent(10.0))  # its start event, on the fake device clock
    rows = [r for r in ins.collect() if r["clock"] == "cuda-graph"]
    got = [(r["name"], r["step"], r["start_ms"], r["dur_ms"]) for r in rows]
    assert got == [("embed", 5, 10.0, 0.25), ("L0", 5, 10.25, 0.25), ("L1", 5, 10.5, 0.25),
                   ("lm_head", 5, 10.75, 0.25), ("sample", 5, 11.0, 0.25)]


def test_marks_outside_stamped_regions_need_no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pending timestamp never outlives a region entry that is not `stamped`: it is written before that region's
    GPU work; and nothing is left pending when the capture closes."""
    writes: list[str] = []
    monkeypatch.setattr(k_stamp, "stamp", lambda slot: writes.append("stamp"))
    ins = Instrument("layer", "cpu", nvtx=False)
    with ins.capturing(torch.zeros(8, dtype=torch.int64)) as timer:
        with ins.region("a", "layer", chain=True):
            assert timer.pending is None and writes == ["stamp"]
        assert timer.pending is not None  # a's end waits for the next mark
        with ins.region("b", "layer", chain=True):
            assert timer.pending is None and writes == ["stamp", "stamp"]
    assert timer.pending is None and writes == ["stamp"] * 3
    assert [(r.start, r.end) for r in timer.marks] == [(0, 1), (1, 2)]


def test_kernel_sources_ship_with_the_package() -> None:
    """Every kernel's CUDA source is package data (read through importlib.resources), with the entry points that
    the kernel modules of `kvscope.kernels` launch."""
    from kvscope.kernels.launch import KERNEL_FILES, kernel_file
    from kvscope.kernels.loader import nvrtc_code

    expected = {"kvscope_stamp": ["kvscope_stamp"],
                "kvscope_rms_norm": ["kvscope_rms_norm_vec", "kvscope_rms_norm_scalar"],
                "kvscope_silu_mul": ["kvscope_silu_mul_vec", "kvscope_silu_mul_scalar"],
                "kvscope_rope_kv": ["kvscope_rope_kv_vec", "kvscope_rope_kv_scalar"]}
    assert set(KERNEL_FILES) == set(expected)
    for entry, names in expected.items():
        src = nvrtc_code(kernel_file(entry))  # what NVRTC compiles (the CMake build: test_cmake_build.py)
        assert "#if defined(KV_BF16)" in src  # the shared element-type prelude comes first
        for name in names:
            assert f'extern "C" __global__ void {name}(' in src


def test_one_module_per_kernel_source() -> None:
    """`cuda/<stem>.cu` is called through `kvscope/kernels/<stem>.py`, which launches that source's entries and no
    other's; the package's other modules (common, launch, loader) launch none."""
    from kvscope.kernels.launch import kernel_file
    from kvscope.kernels.loader import CUDA_DIR

    package = CUDA_DIR.parent
    sources = {p.stem for p in CUDA_DIR.glob("*.cu")}
    modules = {p.stem for p in package.glob("*.py")} - {"__init__"}
    assert sources <= modules, sorted(sources - modules)
    for stem in sorted(modules):
        launched = set(re.findall(r'\blaunch\(\s*"(kvscope_\w+)"', (package / f"{stem}.py").read_text()))
        assert launched == ({f"kvscope_{stem}"} if stem in sources else set()), (stem, launched)
    assert all(kernel_file(f"kvscope_{stem}") == f"{stem}.cu" for stem in sources)


def test_capture_that_fails_writes_no_closing_timestamp(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error inside the capture propagates as it is: no closing timestamp or copy is launched into a capture
    that has already failed, and the instrument leaves capture mode."""
    writes: list[int] = []
    monkeypatch.setattr(k_stamp, "stamp", lambda slot: writes.append(1))
    ins = Instrument("layer", "cpu", nvtx=False)
    stamps = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="boom"), ins.capturing(stamps), ins.region("a", "layer", chain=True):
        raise RuntimeError("boom")
    assert ins._capture is None and writes == [1]  # a's start only
