source .carry/device-env.sh
mkdir -p $OUT/r
python3 -m kvscope calibrate 2>&1 | grep TFLOP | tee $OUT/r/calib.log
python3 -m pytest -q -m gpu tests/test_gpu_kernels.py tests/test_gpu_run.py -k "rms_norm or graph_mode" 2>&1 | tail -2 | tee $OUT/r/t.log
for b in 1 8; do s=60; [ $b = 8 ] && s=160; python3 benchmarks/instrument_overhead.py --batches 1,32 --attn sdpa,eager --graphs on --block $b --steps $s --json $OUT/r/overhead_b$b.json 2>&1 | tee $OUT/r/overhead_b$b.log; done
for bs in 1 32; do for g in none phase layer op; do echo "bs$bs $g $(python3 -m kvscope run --batch-size $bs --seq 512 --gen-tokens 64 --reps 5 --granularity $g --out $OUT/runs/b${bs}$g 2>&1 | grep -E 'TPOT')"; done; done | tee $OUT/r/tpot.log
python3 -m kvscope run --seq 4096 --gen-tokens 2 --reps 7 --out $OUT/runs/p4096 2>&1 | grep -E "TTFT|prefill" | tee $OUT/r/p4096.log
python3 -m kvscope run --batch-size 64 --seq 512 --gen-tokens 32 --out $OUT/runs/b64 2>&1 | grep -E "TPOT|decode tok|peak|KV" | tee $OUT/r/b64.log
python3 - <<'PY' 2>&1 | tee $OUT/r/sums.log
import pandas as pd, os, json
out=os.environ["OUT"]
for g in ["p4096","b64","b1phase","b1layer"]:
    s=pd.read_parquet(f"{out}/runs/{g}/summary.parquet").iloc[0]
    print(g, {k: (round(float(s[k]),4) if isinstance(s[k], (int,float)) else s[k]) for k in s.index if any(x in k for x in ("tpot_p50","ttft_p50","prefill_mfu","decode_mbu","prefill_tflop","peak","kv_","tok_s"))})
t=pd.read_parquet(f"{out}/runs/b1layer/timings.parquet")
d=t[(t.phase=="decode")&(t.level=="layer")]
print(d.groupby("name")["dur_ms"].median().head(6).to_dict(), "layers per step", len(d)/len(t[t.level=="step"]))
PY
python3 -m kvscope nsys --out $OUT/nsys -- --seq 512 --gen-tokens 16 --reps 2 2>&1 | tail -4
python3 - <<'PY' 2>&1 | tee $OUT/r/nsys.log
import pandas as pd, os
out=os.environ["OUT"]
st=pd.read_parquet(f"{out}/nsys/steps.parquet")
print(st[st.phase=="decode"][["step","gpu_span_ms","gpu_busy_ms","kernels"]].describe().to_string())
kc=pd.read_parquet(f"{out}/nsys/kernel_classes.parquet"); print(kc.to_string()[:3000])
PY
cd $OUT && tar czf r.tgz r
