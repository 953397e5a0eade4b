source .carry/device-env.sh
mkdir -p $OUT/r
python3 -m kvscope calibrate 2>&1 | grep TFLOP | tee $OUT/r/calib.log
python3 benchmarks/decode_vs_hf.py --impls hf-eager,kvscope-eager,kvscope-graphs --batches 1,8,64 --contexts 512,4096 --json $OUT/r/decode_vs_hf.json 2>&1 | grep -v Warn | tee $OUT/r/dvh_a.log
timeout 420 python3 benchmarks/decode_vs_hf.py --impls hf-static-compiled,kvscope-graphs --batches 1 --contexts 512,4096 --json $OUT/r/decode_vs_hf.json 2>&1 | grep "^|" | tee $OUT/r/dvh_b.log
cd $OUT && tar czf r.tgz r
