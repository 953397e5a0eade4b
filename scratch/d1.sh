set -x
source .carry/device-env.sh
mkdir -p $OUT/r
python3 -c "import torch; print(torch.__version__, hasattr(torch.cuda, '_compile_kernel'))"
python3 -m pytest -q -x -m gpu tests/test_gpu_kernels.py 2>&1 | tail -25 | tee $OUT/r/kt.log
python3 benchmarks/kernels.py --json $OUT/r/kernels.json 2>&1 | tee $OUT/r/kbench.log
python3 benchmarks/prefill_profile.py --kernels on --top 14 2>&1 | tee $OUT/r/prefill_on.log
python3 -m kvscope calibrate 2>&1 | tail -5
for g in phase layer op; do python3 -m kvscope run --seq 512 --gen-tokens 64 --reps 5 --granularity $g --out $OUT/runs/g$g 2>&1 | grep -E "TPOT|tpot|prefill|Error|error" | head -5; done
python3 -m kvscope run --seq 4096 --gen-tokens 2 --reps 5 --out $OUT/runs/p4096 2>&1 | tail -15
python3 - <<'PY' 2>&1 | tee $OUT/r/runs.log
import pandas as pd, os
out=os.environ["OUT"]
for g in ["gphase","glayer","gop","p4096"]:
    s=pd.read_parquet(f"{out}/runs/{g}/summary.parquet").iloc[0]
    print(g, {k: round(float(s[k]),4) for k in s.index if any(x in k for x in ("tpot_p50","ttft_p50","prefill_mfu","decode_mbu","prefill_tflop"))})
PY
tar czf $OUT/r.tgz -C $OUT r runs/gphase/summary.parquet runs/glayer/timings.parquet 2>/dev/null
