"""Export a trained model's inference path for profiling on a device: TorchScript, torch.export or ONNX.

    python jit_trace_model.py -t configs/example_model/example_training_cfg.yaml -c latest -i 1 1 4 4

Writes, under the checkpoint's folder, names carrying the input shape (here 1x1x4x4), so that
exports for other shapes add files rather than replace them:
- jit/<checkpoint>_1x1x4x4_traced.pt (torch.jit.load-able; the default format), or
  _1x1x4x4_exported.pt2 (torch.export.load; --format export), or _1x1x4x4.onnx (--format onnx,
  needs onnx and onnxruntime);
- jit/<checkpoint>_input_1x1x4x4.raw: the example input, raw float32 values in C order, to feed
  the model on the device, and a .json beside it saying so (shape, dtype, layout, checkpoint).
Every artifact is checked against the eager model on a fresh random input before anything is
written. --benchmark N times eager against the artifact on this machine (--device cpu or cuda).
"""
from cli import add_training_cfg, answer_early, make_parser

FORMATS = {"torchscript": "_traced.pt", "export": "_exported.pt2", "onnx": ".onnx"}  # --format: file endings


def parse_args(argv):
    parser = make_parser(__doc__.splitlines()[0], "python jit_trace_model.py "
                         "-t configs/example_model/example_training_cfg.yaml -c latest -i 1 1 4 4")
    add_training_cfg(parser)
    parser.add_argument("-c", "--checkpoint", required=True, metavar="PTH",
                        help="checkpoint to export: latest (the newest of the newest run), best (saving.keep_best's), "
                             "a run folder (run_3: "
                             "its newest), a checkpoint file name of one of the runs, or a path")
    parser.add_argument("-i", "--input_size", required=True, nargs="+", type=int, metavar="N",
                        help="shape of the example input, batch first, e.g. 1 1 4 4 (named 1x1x4x4 in the files)")
    parser.add_argument("--format", choices=list(FORMATS), default="torchscript",
                        help="torchscript (torch.jit.trace, the default: jit/<checkpoint>_<shape>_traced.pt), "
                             "export (torch.export: _<shape>_exported.pt2) or onnx (_<shape>.onnx)")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="time N forward passes of the eager model and of the artifact (median, p90)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="where --benchmark runs: cpu (default) or cuda[:id]; ONNX Runtime runs on the CPU")
    parser.add_argument("--no_ema", action="store_true",
                        help="export the generator's own weights, not their moving average (training.ema_decay)")
    return parser.parse_args(argv)


answer_early(__name__, parse_args)  # --help in a fraction of a second: before torch is imported

import json
import statistics
import time
import warnings

import torch

from errors import UserError, run_main
from runs import Run, load_trained_run

TOLERANCE = 1e-5  # max abs difference allowed between an artifact's outputs and eager ones


def main(argv):
    args = parse_args(argv)
    if any(n < 1 for n in args.input_size):
        raise UserError(f"--input_size {' '.join(map(str, args.input_size))}: every size must be >= 1")
    if args.benchmark < 0:
        raise UserError(f"--benchmark {args.benchmark}: give a number of runs >= 1 (or leave it out)")
    device = benchmark_device(args.device)
    cfg, model, path, _ = load_trained_run(args.training_cfg, args.checkpoint, "--checkpoint", args.overrides,
                                           use_ema=not args.no_ema)
    model.eval()
    expected = (args.input_size[0], *model.input_size)
    if tuple(args.input_size) != expected:
        raise UserError(f"--input_size {' '.join(map(str, args.input_size))}: the model's input "
                        f"'{model.input_key}' has shape {list(model.input_size)} per sample (see "
                        f"{model.architecture_path}); use -i {' '.join(map(str, expected))}")
    generator = torch.Generator().manual_seed(cfg["training"]["seed"])
    example = torch.randn(args.input_size, generator=generator)
    run_artifact, write = EXPORTERS[args.format](model, example, cfg["model"]["model_flow_path"])
    check = torch.randn(args.input_size, generator=generator)
    with torch.no_grad():
        diff = (run_artifact(check) - model(check)).abs().max().item()
    if diff > TOLERANCE:
        raise UserError(f"{cfg['model']['model_flow_path']}: the {args.format} model differs from the eager one on a "
                        f"new input (max abs difference {diff:.3g} > {TOLERANCE}); forward probably has "
                        "data-dependent control flow, which tracing cannot capture")
    run, shape = Run.of(cfg, folder=path.parent), "x".join(map(str, args.input_size))  # jit/ beside the checkpoint
    artifact_path = run.write_export(f"{path.stem}_{shape}{FORMATS[args.format]}", write)
    raw = example.contiguous().numpy().astype("float32").tobytes(order="C")
    input_path = run.write_export(f"{path.stem}_input_{shape}.raw", lambda f: f.write(raw))
    sidecar = {"shape": list(args.input_size), "dtype": "float32", "layout": "C order (row-major), batch first",
               "input": model.input_key, "checkpoint": path.name, "model": artifact_path.name, "format": args.format,
               "max_abs_difference_to_eager": diff}
    text = json.dumps(sidecar, indent=2).encode()
    run.write_export(input_path.with_suffix(".json").name, lambda f: f.write(text))
    print(f"{args.format} model of {path.name}: max abs difference to eager {diff:.2e}")
    print(f"saved {artifact_path}\nsaved {input_path} (float32, C order, shape {shape}) and its .json")
    if args.benchmark:
        if device.type != "cpu" and args.format != "onnx":
            model, run_artifact = model.to(device), run_artifact.to(device)
        benchmark(model, run_artifact, example, args.benchmark, args.format, device)


def to_torchscript(model, example, flow_path):
    print("note: PyTorch marks TorchScript as deprecated in favour of torch.export (--format export); the "
          "traced model still loads with torch.jit.load and in LibTorch.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # said once, above
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    return traced, lambda f: torch.jit.save(traced, f)


def to_export(model, example, flow_path):
    try:
        exported = torch.export.export(model, (example,))
    except Exception as e:  # torch.export names the line it cannot capture
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{flow_path}: torch.export cannot capture forward ({first}); data-dependent control flow "
                        "is the usual cause (see torch.cond)") from None
    return exported.module(), lambda f: torch.export.save(exported, f)


def to_onnx(model, example, flow_path):
    try:
        import onnxruntime
    except ImportError:
        raise UserError("--format onnx: needs the onnx, onnxscript and onnxruntime packages "
                        "(pip install onnx onnxscript onnxruntime)") from None
    try:
        program = torch.onnx.export(model, (example,), dynamo=True)
    except Exception as e:
        raise UserError(f"{flow_path}: ONNX export failed: {str(e).strip().splitlines()[0]}") from None
    data = program.model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x):
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run, lambda f: f.write(data)


EXPORTERS = {"torchscript": to_torchscript, "export": to_export, "onnx": to_onnx}


def benchmark_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use cpu or cuda (cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: use cpu or cuda (cuda:1, ...)")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); use cpu")
    return device


@torch.no_grad()
def benchmark(model, run_artifact, example, n, fmt, device):
    """Latency of eager and of the artifact: a first look before profiling on the device."""
    results = {}
    on = "cpu" if fmt == "onnx" else device  # ONNX Runtime here runs on the CPU provider
    for name, fn, where in (("eager", model, device), (fmt, run_artifact, on)):
        x = example.to(where)
        for _ in range(max(3, n // 10)):  # warm-up
            fn(x)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn(x)
            if torch.device(where).type == "cuda":
                torch.cuda.synchronize(where)  # the GPU runs asynchronously: wait for the result
            times.append(time.perf_counter() - start)
        times.sort()
        results[name] = (statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))])
    print(f"latency on {device}{' (ONNX Runtime on the CPU)' if fmt == 'onnx' and device.type != 'cpu' else ''}, "
          f"batch {example.shape[0]}, {n} runs after warm-up:")
    for name, (median, p90) in results.items():
        print(f"  {name:<12} median {median * 1e3:8.3f} ms   p90 {p90 * 1e3:8.3f} ms")
    print(f"  eager / {fmt}: {results['eager'][0] / results[fmt][0]:.2f}x (median)")


if __name__ == "__main__":
    run_main(main)
