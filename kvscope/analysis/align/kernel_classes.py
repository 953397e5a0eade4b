"""Kernel classes by name: one ordered, case-insensitive rule table; the first rule whose pattern matches wins.

The class comes from the GPU operation's (demangled) name alone, so it says what kind of kernel ran, not which model
op launched it: RMSNorm in eager PyTorch, for instance, runs as a pow, a mean, an rsqrt and two multiplies, of which
only the pow, the mean and the rsqrt are recognisably a norm. For the op, use op granularity and each kernel's range.

Classes (`CLASSES`): gemm, attention, norm, elementwise, copy/memset, communication, other. Decisions worth knowing:
- softmax kernels are attention (in a decoder they are eager attention's); log-softmax, top-k, sampling, argmax and
  MoE routing (top-k gating, `moe_align_block_size`, token sorting) are other;
- Marlin, `fused_moe_kernel` and the other quantised or MoE matrix products are gemm;
- torch's reductions (`reduce_kernel`) and Inductor's reduction kernels count with elementwise (memory-bound vector
  work) unless they are recognisably a norm (a mean, an rsqrt) or sampling (argmax);
- KV-cache writes (`reshape_and_cache_flash_kernel`, FlashInfer's `AppendPagedKVCacheKernel`), gathers, casts,
  concatenations and fills are copy/memset; rotary embeddings are elementwise;
- memcpy and memset operations are copy/memset by their nsys names (`[CUDA memcpy Device-to-Device]`, `[CUDA memset]`).

User rules: `load_rules(path)` reads a small file whose rules are tried before the built-in ones, so they override
them. TOML (any suffix but `.json`)::

    [[rule]]
    class = "attention"             # one of CLASSES
    pattern = "my_paged_attn"       # a Python regular expression, searched case-insensitively in the name
    note = "our paged attention"    # optional

    [[rule]]
    class = "gemm"
    pattern = "^my_(w4a16|fp8)_mm"

or JSON (suffix `.json`): `{"rule": [{"class": "attention", "pattern": "my_paged_attn"}]}`. Rules are tried in file
order. A file that cannot be read or parsed, a rule that is not a table, lacks `class` or `pattern`, has another key,
names an unknown class or holds a bad regex is a one-line KvscopeError naming the file and the rule's number.

`classify(names, rules=None)` classes a Series of names: each distinct name once (one pass per rule over the names
no earlier rule matched), then mapped back by integer codes, so a million kernels of a few thousand names take
tens of milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kvscope.analysis.nsys.filters import wrong_value
from kvscope.errors import KvscopeError

COPY = "copy/memset"
OTHER = "other"
CLASSES = ("gemm", "attention", "norm", "elementwise", COPY, "communication", OTHER)
RULE_KEYS = ("class", "pattern", "note")

# (class, pattern, what it catches): tried in this order, case-insensitively, first match wins; no match is "other".
# Patterns are written in lowercase (see _compile)
KERNEL_CLASS_RULES: tuple[tuple[str, str, str], ...] = (
    (COPY, r"^\[cuda mem(cpy|set)|^mem(cpy|set)\b",
     "memcpy and memset operations as nsys ([CUDA memcpy Device-to-Device], [CUDA memset]) and Kineto name them"),
    ("communication",
     r"nccl|(?<!sm)all_?reduce|(?<!sm)all_?gather|reduce_?scatter|all_?to_?all|send_?recv|cross_device_reduce"
     r"|quick_?reduce|deep_?ep|hybrid_?ep|nvshmem|multimem",
     "NCCL (ncclDevKernel_AllReduce_Sum_bf16_RING_LL, ncclKernel_...), vLLM / SGLang custom all-reduce "
     "(cross_device_reduce_1stage), TensorRT-LLM / FlashInfer all-reduce fusion, one-shot / multimem all-reduce, "
     "DeepEP / HybridEP"),
    (OTHER, r"arg_?max|arg_?min|top_?k|top_?p|sampling|sampler|multinomial|gumbel|log_?softmax|router|routing"
            r"|moe_align|align_block_size|count_and_sort",
     "sampling (argmax, top-k / top-p, FlashInfer sampling, log-softmax of logprobs) and MoE routing "
     "(topk_softmax / topkGatingSoftmax, moe_align_block_size, expert sorting): before norm and attention, since "
     "'topk_softmax' holds 'softmax'"),
    ("norm", r"rms_?norm|layer_?norm|group_?norm|batch_?norm|qk_?norm|meanops|rsqrt|pow_tensor_scalar"
             r"|rowwisemoments|welford",
     "fused norms (vLLM rms_norm_kernel / fused_add_rms_norm_kernel, FlashInfer RMSNorm, torch layer_norm, "
     "kvscope_rms_norm, Inductor's ..._mean_mul_pow_rsqrt), and eager RMSNorm's pow, mean and rsqrt"),
    (COPY, r"reshape_and_cache|concat_and_cache|copy_blocks|swap_blocks|append_?paged_?kv|store_?kv_?cache"
           r"|set_kv_buffer",
     "KV-cache writes (vLLM reshape_and_cache_flash_kernel, FlashInfer AppendPagedKVCacheKernel): before attention, "
     "since 'reshape_and_cache_flash' holds 'flash'"),
    ("elementwise", r"^triton_poi_fused\w*(scaled_dot_product|attention|attn|sdpa|flash)",
     "Inductor pointwise kernels named after an attention op whose inputs they prepare (mask, RoPE, cache update "
     "fused: triton_poi_fused__scaled_dot_product_cudnn_attention_..._where_4 of transformers' compiled decode "
     "step): pointwise work, not attention; before attention"),
    ("attention", r"flash(?!infer)|fmha|(?<![a-z])mha|sdpa|attention|attn|softmax|(prefill|decode|pod)with\w*kvcache"
                  r"|mergestates?|^_fwd_(grouped_)?kernel",
     "FlashAttention 2/3 (flash_fwd_kernel, flash_fwd_splitkv[_combine]_kernel, flash::, pytorch_flash::), cuDNN "
     "(cudnn_generated_fort_native_sdpa, sm90_flash_fprop), memory-efficient (fmha_cutlassF, efficient_attention), "
     "FlashInfer (Batch/Single Prefill/Decode With...KVCache, MergeStates; not the rest of the flashinfer namespace), "
     "vLLM paged and Triton attention (_fwd_kernel, _fwd_grouped_kernel_stage1, kernel_unified_attention), softmax: "
     "before gemm, since these kernels carry cutlass types"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|cublas|xmma|splitkreduce|matmul|marlin|fused_moe|moe_wna16"
             r"|^triton_tem_fused\w*_(add|b)?mm(_|$)|(?<![a-z])(add|b)?mm_kernel|_mm(_|$)|dot_kernel|mul_mat",
     "cuBLAS / cuBLASLt (sm90_xmma_gemm, ampere_bf16_s16816gemm, nvjet on Hopper, gemvx, gemv2T, splitKreduce), "
     "CUTLASS, Marlin and MoE matrix products (fused_moe_kernel, marlin_moe_wna16), Triton matmuls, Inductor "
     "mm templates (triton_tem_fused_mm_0), llama.cpp mul_mat"),
    ("elementwise", r"rotary|(?<![a-z])m?rope",
     "rotary embeddings (rotary_embedding_kernel, FlashInfer ApplyRotary, kvscope's RoPE + KV write): before copy, "
     "since 'rotary_embedding' holds 'embedding'"),
    (COPY, r"^triton_(poi|per|red)_fused(_(_to_copy|_unsafe_view|clone|cat|copy|view|permute|transpose|index_put|index"
           r"|embedding|slice_scatter|select_scatter|slice|select|scatter|gather|constant_pad_nd|new_zeros|zeros_like"
           r"|zeros|full|fill|stack|expand|unsqueeze|squeeze|t|repeat|split|narrow|as_strided|reshape|lift_fresh))+"
           r"_\d+$",
     "Inductor kernels that only cast, copy, gather or concatenate (triton_poi_fused__to_copy_0, ..._cat_clone_1)"),
    ("elementwise", r"^triton_(poi|per|red)_",
     "the rest of Inductor's pointwise (poi) and reduction (red, per) kernels"),
    (COPY, r"copy|scatter|gather|index|catarray|concat|(?<!pre)fill|memset|memcpy|transpose|permute|embedding|arange"
           r"|triu_tril",
     "casts and copies (direct_copy_kernel_cuda, bfloat16_copy), torch.cat, scatter / gather / index_select "
     "(embedding lookups), fills and aranges; 'fill' not after 'pre' (FlashInfer's BatchPrefill... is attention)"),
    ("elementwise", r"elementwise|functor|pointwise|activation|act_and_mul|silu|gelu|relu|swiglu|sigmoid|tanh"
                    r"|quant|reduce|(?<![a-z])(add|mul|div|sub|neg|exp|where|clamp|abs|sqrt|cos|sin|sum|max|min)"
                    r"(?![a-z])",
     "the remaining pointwise kernels (torch's vectorized / unrolled elementwise_kernel, SiLU*up, act_and_mul, "
     "adds, multiplies, quantisation) and reductions (torch reduce_kernel, moe_sum_reduce)"),
)


@dataclass(frozen=True)
class Rule:
    """One rule: names matching `pattern` (searched case-insensitively) are of `kernel_class`. `origin` says where
    the rule comes from: `built-in` or `FILE rule N`."""

    kernel_class: str
    pattern: str
    note: str
    origin: str = "built-in"


def _compile(pattern: str) -> tuple[re.Pattern[str], bool]:
    """The pattern compiled for case-insensitive search, and whether it runs on lowercased names: a pattern without
    capital letters (all built-in ones) is searched case-sensitively in the lowercased name, which is equivalent for
    ASCII names and several times faster than re.IGNORECASE; one with capitals (`[A-Z]`, `\\W`) keeps the flag."""
    if pattern == pattern.lower():
        return re.compile(pattern), True
    return re.compile(pattern, re.IGNORECASE), False


@dataclass(frozen=True)
class Rules:
    """An ordered rule list (first match wins, no match is `other`), its patterns compiled once."""

    rules: tuple[Rule, ...]
    _compiled: tuple[tuple[int, re.Pattern[str], bool], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = tuple((CLASSES.index(r.kernel_class), *_compile(r.pattern)) for r in self.rules)
        object.__setattr__(self, "_compiled", compiled)

    def table(self) -> pd.DataFrame:
        """The rules as a DataFrame (order, class, pattern, note, origin)."""
        return pd.DataFrame({
            "order": np.arange(1, len(self.rules) + 1),
            "kernel_class": [r.kernel_class for r in self.rules],
            "pattern": [r.pattern for r in self.rules],
            "note": [r.note for r in self.rules],
            "origin": [r.origin for r in self.rules],
        })

    def class_codes(self, names: Sequence[str]) -> np.ndarray:
        """Index into CLASSES of each name: every rule searches only the names no earlier rule matched."""
        lowered = [n.lower() for n in names]
        out = np.full(len(names), CLASSES.index(OTHER), dtype=np.int8)
        todo = np.arange(len(names))
        for code, pat, on_lowered in self._compiled:
            if not len(todo):
                break
            text = lowered if on_lowered else names
            hit = np.fromiter((pat.search(text[i]) is not None for i in todo), dtype=bool, count=len(todo))
            out[todo[hit]] = code
            todo = todo[~hit]
        return out


BUILTIN_RULES = Rules(tuple(Rule(cls, pat, note) for cls, pat, note in KERNEL_CLASS_RULES))


def classify(names: pd.Series, rules: Rules | pd.Series | None = None) -> pd.Series:
    """Class of every GPU operation by its name (missing names are `other`), as a Categorical over CLASSES with the
    index of `names`. `rules`: from `load_rules` (user rules, then the built-ins); None for the built-ins alone.

    The older call `classify(kind, name)` still works: a Series as second argument is taken as the names (memcpy and
    memset operations are classed by their nsys names, so the kinds are not needed)."""
    if isinstance(rules, pd.Series):
        names, rules = rules, None
    use = BUILTIN_RULES if rules is None else rules
    codes, uniques = pd.factorize(names, use_na_sentinel=True)
    by_unique = use.class_codes([str(u) for u in uniques])
    # factorize gives -1 for a missing name: the appended last entry, "other"
    by_unique = np.append(by_unique, np.int8(CLASSES.index(OTHER)))
    cat = pd.Categorical.from_codes(by_unique[codes], categories=CLASSES)
    return pd.Series(cat, index=names.index)


def classify_name(name: str | None, rules: Rules | None = None) -> str:
    """Class of one kernel name (`other` for a missing or empty one)."""
    if not name:
        return OTHER
    use = BUILTIN_RULES if rules is None else rules
    return CLASSES[int(use.class_codes([name])[0])]


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _read_document(path: Path) -> object:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise KvscopeError(f"{path}: cannot read the kernel-class rules ({e.strerror or _one_line(e)})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KvscopeError(f"{path}: kernel-class rules are not UTF-8 text ({_one_line(e)})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as e:
            raise KvscopeError(f"{path}: not valid JSON ({_one_line(e)})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise KvscopeError(f"{path}: not valid TOML ({_one_line(e)})") from None


def _rule(path: Path, number: int, entry: object) -> Rule:
    where = f"{path}: rule {number}"
    if not isinstance(entry, dict):
        raise KvscopeError(f"{where}: expected a table with class and pattern, got {type(entry).__name__}")
    extra = sorted(str(k) for k in entry if k not in RULE_KEYS)
    if extra:
        raise KvscopeError(f"{where}: unknown key(s) {', '.join(extra)} (keys: {', '.join(RULE_KEYS)})")
    for key in ("class", "pattern"):
        if key not in entry:
            raise KvscopeError(f"{where}: lacks '{key}'")
    cls, pattern, note = entry["class"], entry["pattern"], entry.get("note", "")
    if not isinstance(cls, str) or cls not in CLASSES:
        raise KvscopeError(f"{where}: unknown class {cls!r} (classes: {', '.join(CLASSES)})")
    if not isinstance(pattern, str) or not pattern:
        raise KvscopeError(f"{where}: pattern must be a non-empty string, got {pattern!r}")
    if not isinstance(note, str):
        raise KvscopeError(f"{where}: note must be a string, got {note!r}")
    try:
        re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise KvscopeError(f"{where}: bad regex {pattern!r} ({_one_line(e)})") from None
    return Rule(cls, pattern, note or "user rule", f"{path} rule {number}")


def resolve_rules(classes: str | os.PathLike[str] | Rules | None) -> Rules | None:
    """`--classes`: None (the built-in rules alone), a rules file (`load_rules`), or rules already loaded; anything
    else (the Python API passes it unparsed) is a one-line KvscopeError."""
    if classes is None or isinstance(classes, Rules):
        return classes
    if isinstance(classes, str) or (isinstance(classes, os.PathLike) and isinstance(os.fspath(classes), str)):
        return load_rules(Path(classes))
    raise KvscopeError("--classes must be a rules file (a path) or loaded rules (kernel_classes.load_rules), got "
                       f"{wrong_value(classes)}")


def load_rules(path: str | Path) -> Rules:
    """User rules from a TOML or JSON file (format: the module docstring), tried before the built-in rules.
    Raises KvscopeError (one line, naming the file and the rule) on any problem with the file."""
    p = Path(path)
    doc = _read_document(p)
    if not isinstance(doc, dict) or "rule" not in doc:
        raise KvscopeError(f"{p}: no rules: expected [[rule]] tables (TOML) or {{\"rule\": [...]}} (JSON)")
    extra = sorted(str(k) for k in doc if k != "rule")
    if extra:
        raise KvscopeError(f"{p}: unknown top-level key(s) {', '.join(extra)} (only 'rule')")
    entries = doc["rule"]
    if not isinstance(entries, list):
        raise KvscopeError(f"{p}: 'rule' must be a list of tables ([[rule]] in TOML, not [rule])")
    if not entries:
        raise KvscopeError(f"{p}: 'rule' holds no rules")
    user = tuple(_rule(p, i, e) for i, e in enumerate(entries, start=1))
    return Rules(user + BUILTIN_RULES.rules)
