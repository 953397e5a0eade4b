source .carry/device-env.sh
mkdir -p $OUT/r
python3 -m kvscope calibrate 2>&1 | tail -2 | tee $OUT/r/calib.log
timeout 330 python3 -m pytest -q -m gpu tests -s 2>&1 | grep -E "passed|failed|FAILED|Error|rel err|host p50|ready in|logits, kernels" | tee $OUT/r/gputests.log
python3 benchmarks/kernels.py --json $OUT/r/kernels.json 2>&1 | tee $OUT/r/kbench.log
python3 benchmarks/instrument_overhead.py --batches 1,32 --attn sdpa,eager --graphs on --json $OUT/r/overhead_graphs.json 2>&1 | tee $OUT/r/overhead.log
python3 benchmarks/prefill_profile.py --kernels on --top 10 2>&1 | grep -v Warn | tee $OUT/r/prefill_on.log
cd $OUT && tar czf r.tgz r
