#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (estimated at 5-8 minutes on one H100/H200; not yet run on one):
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]            # figures and logs go to OUT_DIR (default: gpu_checks/ in the repository)
#   GPU_CHECKS_DEVICE=cpu bash benchmarks/gpu_checks.sh  # a rehearsal on the CPU (gloo, tiny benchmark)
#
# 0. tests/test_cuda.py: fused optimizers, a step with no host-device sync (sync debug mode),
#    batches cut on the GPU, CUDA graphs against eager steps (20 steps, allclose weights).
# 1. benchmarks/bench_train_loop.py at the DCGAN of pytorch/examples (64x64 images, ngf = ndf = 64,
#    batch 128): the pipeline's training step against the hand-written loop in fp32, bf16 and
#    compiled, with whether bf16 and compile help, and the pipeline's best settings (bf16, fused,
#    CUDA graphs) against the plain eager fp32 loop (target 2x); then fp32 with both sides under
#    DDP (NCCL).
# 2. torchrun with one process on NCCL: the toy GAN through the DDP wrappers; then with fp16 (a
#    gradient scaler per network), gradient accumulation and the R1 gradient penalty; then bf16
#    with training.compile, channels_last, the generator's EMA, and sample metrics every epoch
#    (pixel features: the machine cannot download Inception's) keeping the best checkpoint, the
#    data on the GPU. Then plain python train.py with CUDA graphs (bf16, data on the GPU): the toy
#    GAN, and the shape classifier (one network).
# 3. evaluate.py (with sample metrics, on the best checkpoint) and jit_trace_model.py
#    (TorchScript, torch.export and ONNX where onnxruntime is installed, timed; torch.export with
#    --dynamic-batch at batch 64, with its peak memory) on the DDP run.
#
# Each step's output is kept in OUT_DIR/*.log; the script stops at the first failure, or at a
# step that hangs (a timeout on each: a stuck NCCL call must not eat a rented GPU's time).
set -euo pipefail
out=$(realpath -m "${1:-$(dirname "$0")/../gpu_checks}")  # (absolute: the scripts get it in --set)
cd "$(dirname "$0")/.."
mkdir -p "$out"
if [[ ${GPU_CHECKS_DEVICE:-cuda} == cuda ]]; then
    device=cuda gpus='[0]'
    bench=(--device cuda --size 64 --width 64 --batch-size 128)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
else
    device=cpu gpus='[]'
    bench=(--quick --size 8 --width 8 --batch-size 4 --cases fp32)
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
train_cfg=configs/example_model/example_multigpu_training_cfg.yaml

ddp_run() {  # ddp_run NAME [--set ...]: the multi-GPU example on one GPU, one process, two epochs
    local name=$1; shift
    timeout 300 torchrun --standalone --nnodes=1 --nproc_per_node=1 train.py -t "$train_cfg" \
        --set "training.gpus=$gpus" --set training.n_epochs=2 --set saving.save_epoch_increment=1 \
        --set "saving.save_folder_name=$out/$name" "$@" 2>&1 | tee "$out/$name.log"
    grep -q "x 1 process(es), .* (DDP)" "$out/$name.log" && grep -q "trained to epoch 2" "$out/$name.log"
}

if [[ $device == cuda ]]; then
    echo "== 0. tests/test_cuda.py"
    timeout 300 python -m pytest -q -x -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
fi

echo "== 1. bench_train_loop.py"
timeout 420 python benchmarks/bench_train_loop.py "${bench[@]}" --json "$out/bench_train_loop.json" 2>&1 \
    | tee "$out/bench_train_loop.log"

echo "== 1b. bench_train_loop.py under torchrun: both sides through DDP (one process)"
timeout 300 torchrun --standalone --nproc_per_node=1 benchmarks/bench_train_loop.py "${bench[@]}" --cases fp32 \
    --json "$out/bench_train_loop_ddp.json" 2>&1 | tee "$out/bench_train_loop_ddp.log"

echo "== 2. torchrun, one process ($device)"
ddp_run ddp_fp32
ddp_run ddp_fp16_r1_accumulated --set training.precision=fp16 --set training.grad_accumulation_steps=2 \
    --set loss.loss_fn=bce_gan_loss --set 'loss.loss_args={r1_weight: 1.0}'
ddp_run ddp_bf16_compiled --set training.precision=bf16 --set training.compile=true \
    --set training.channels_last=true --set training.ema_decay=0.99 --set sample_metrics.every_epochs=1 \
    --set sample_metrics.feature_extractor=pixels --set 'sample_metrics.metrics=[fid,kid,precision_recall]' \
    --set saving.keep_best=fid --set dataset.on_device=$([[ $device == cuda ]] && echo true || echo null)
grep -q "best checkpoint: " "$out/ddp_bf16_compiled.log"
if [[ $device == cuda ]]; then
    echo "== 2b. CUDA graphs, one GPU without torchrun"
    for cfg in configs/example_model/example_training_cfg.yaml configs/shape_classifier/shape_classifier_training_cfg.yaml; do
        name=graphs_$(basename "$cfg" _training_cfg.yaml)
        timeout 300 python train.py -t "$cfg" --set "training.gpus=$gpus" --set training.n_epochs=2 \
            --set training.cuda_graphs=true --set training.precision=bf16 --set dataset.on_device=true \
            --set "saving.save_folder_name=$out/$name" 2>&1 | tee "$out/$name.log"
        grep -q "trained to epoch 2" "$out/$name.log" && ! grep -q "could not be recorded" "$out/$name.log"
    done
fi

echo "== 3. evaluate.py and jit_trace_model.py on the last run"
run_folder="$out/ddp_bf16_compiled"
python evaluate.py -t "$train_cfg" -e configs/example_model/example_evaluation_cfg.yaml \
    --set "saving.save_folder_name=$run_folder" --set "evaluation.gpus=$gpus" \
    --set evaluation.model_checkpoint_filename=best --set 'evaluation.sample_metrics=[fid,kid,precision_recall]' \
    --set evaluation.feature_extractor=pixels --set evaluation.n_samples=512 2>&1 | tee "$out/evaluate.log"
grep -q '"fid"' "$out/evaluate.log"
formats=(torchscript export)
python -c "import onnx, onnxscript, onnxruntime" 2>/dev/null && formats+=(onnx) || echo "(onnx: not installed, skipped)"
for format in "${formats[@]}"; do
    python jit_trace_model.py -t "$train_cfg" --set "saving.save_folder_name=$run_folder" -c latest -i 1 1 4 4 \
        --format "$format" --device "$device" --benchmark 200 2>&1 | tee "$out/jit_$format.log"
done
# a batch left open (checked at batch 1 and 7 on the CPU), timed and its peak memory read on the device
python jit_trace_model.py -t "$train_cfg" --set "saving.save_folder_name=$run_folder" -c latest -i 64 1 4 4 \
    --format export --dynamic-batch --device "$device" --benchmark 200 2>&1 | tee "$out/jit_export_dynamic.log"
grep -q "^peak memory on $device" "$out/jit_export_dynamic.log"
echo "all checks passed ($device); figures and logs in $out/"
