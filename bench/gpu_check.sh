#!/usr/bin/env bash
# The prepared device check: under 8 minutes on one H100, it tests the CUDA paths and times them, writing result
# files that name the GPU. Steps (each with its own time limit, so one stuck step cannot eat the lease):
#   1. the CUDA kernel tests and the fused-path tests (Triton SpMM/SDDMM, fused W0 + S on CUDA tensors);
#   2. bench/dispatch.py --device cuda: the fused-vs-SpMM crossover, the SDDMM choice and sparse RandLoRA's factored
#      term (B·T) on both paths, measured (the constants of delta/ops.py for CUDA come from this file once it exists),
#      and int32 against int64 positions for the fused path's scatter and gather (SparseSupport.flat);
#   3. bench/sparse_delta.py at the H100 shapes, both paths side by side;
#   4. bench/throughput.py on the roberta-base shape (bf16, 32 x 512), every adapter method;
#   5. if at least 80 s of the 8 minutes are left: the same on QLoRA's NF4 base for LoRA (QLoRA) and our factored
#      tuners, without the memory children (needs bitsandbytes in the device image; it fails on its own otherwise);
#   6. if at least 60 s are left: the LLaMA decoder with every linear adapted (--model llama), the same methods;
#   7. if at least 60 s are left: the causal-LM runner's recipes on CUDA (tests/test_causal_lm.py: NF4, LQ and the
#      HQQ bit-budget base, whose scales must follow the model to the GPU; reload equal, bf16 base);
#   8. if at least 40 s are left: decoding with the adapter unmerged (bench/decode.py, bf16): the Triton SpMM at one
#      token per sequence, which the CPU measurements cannot tell.
#
# The device machine reaches no registry and its image has its own peft / transformers. Before the call, on this
# machine (once):
#     pip download --no-deps -d bench/wheels peft==0.21.2 transformers==5.25.0 termcolor einops
#     pip wheel --no-deps -w bench/wheels omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 hqq==0.2.8.post1
# then through the device tool, from the repository root:
#     run(command="bash bench/gpu_check.sh", carry=["bench/wheels"], timeout_s=540)
# and commit bench/results/*<gpu>* (also copied to $OUT). Give the machine back afterwards.
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-python3}"
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
if ls bench/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps bench/wheels/*.whl >"$OUT/pip.log" 2>&1 || echo "wheel install failed: see pip.log"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'peft', peft.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
start=$SECONDS

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (t=$((SECONDS - start)) s, limit ${limit} s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "rc=$rc" >>"$OUT/$name.log"
    tail -n 4 "$OUT/$name.log"
}

step tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_cuda.py tests/test_fused.py
step dispatch 110 "$PY" bench/dispatch.py --device cuda --rounds 10
step sparse-delta 130 "$PY" bench/sparse_delta.py --device cuda --repeats 10 \
    --shape 8192,4096,4096,0.01 --shape 16384,768,768,0.01 --shape 2048,1024,1024,0.001 \
    --variants base lora densify_lora sparse_triton sltrain sltrain_spmm
step throughput 150 "$PY" bench/throughput.py --device cuda --repeats 10
if (( SECONDS - start < 400 )); then
    step throughput-nf4 $((480 - (SECONDS - start))) "$PY" bench/throughput.py --device cuda --base nf4 --repeats 10 \
        --no-memory --methods lora sltrain sora dylora nola
fi
if (( SECONDS - start < 420 )); then
    step throughput-llama $((480 - (SECONDS - start))) "$PY" bench/throughput.py --device cuda --model llama \
        --repeats 10 --no-memory --methods lora sltrain sora dylora nola sparse_randlora_0.1
fi
if (( SECONDS - start < 420 )); then
    step causal-lm $((480 - (SECONDS - start))) "$PY" -m pytest -q -p no:cacheprovider tests/test_causal_lm.py \
        -k "recipe_trains or hqq_layer or bf16 or squeeze"
fi
if (( SECONDS - start < 440 )); then
    step decode $((480 - (SECONDS - start))) "$PY" bench/decode.py --dtype bfloat16 --rounds 3 --tokens 8
fi
cp bench/results/*nvidia* "$OUT/" 2>/dev/null
echo "== done in $((SECONDS - start)) s; result files:"
ls -1 "$OUT"
