"""Trace a trained model's inference path with TorchScript, for profiling on a device.

    python jit_trace_model.py -t configs/example_model/example_training_cfg.yaml -c latest -i 1 1 4 4

Writes, under the checkpoint's folder, jit/<checkpoint>_traced.pt (torch.jit.load-able) and
jit/<checkpoint>_input_1x1x4x4.raw: the example input the model was traced with, as raw
float32 values in C order, to feed the model on the device. The traced model is checked
against the eager one on a fresh random input before anything is written.
"""
import warnings

import torch

from checkpoint import atomic_write
from cli import add_training_cfg, load_trained_run, make_parser
from errors import UserError, run_main

TOLERANCE = 1e-5  # max abs difference allowed between traced and eager outputs


def main(argv):
    parser = make_parser(__doc__.splitlines()[0],
                         "python jit_trace_model.py -t configs/example_model/example_training_cfg.yaml -c latest -i 1 1 4 4")
    add_training_cfg(parser)
    parser.add_argument("-c", "--checkpoint", required=True, metavar="PTH",
                        help="checkpoint to trace: a file name in the run's checkpoint folder, a path, or latest")
    parser.add_argument("-i", "--input_size", required=True, nargs="+", type=int, metavar="N",
                        help="shape of the example input, batch first, e.g. 1 1 4 4")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.input_size):
        raise UserError(f"--input_size {' '.join(map(str, args.input_size))}: every size must be >= 1")
    cfg, model, path, _ = load_trained_run(args.training_cfg, args.checkpoint, "--checkpoint", args.overrides)
    model.eval()
    expected = (args.input_size[0], *model.input_size)
    if tuple(args.input_size) != expected:
        raise UserError(f"--input_size {' '.join(map(str, args.input_size))}: the model's input "
                        f"'{model.input_key}' has shape {list(model.input_size)} per sample (see "
                        f"{model.architecture_path}); use -i {' '.join(map(str, expected))}")
    generator = torch.Generator().manual_seed(cfg["training"]["seed"])
    example = torch.randn(args.input_size, generator=generator)
    print("note: TorchScript is deprecated in PyTorch in favour of torch.export; the traced model "
          "still loads with torch.jit.load and on PyTorch Mobile / LibTorch.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # said once, above
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
        check = torch.randn(args.input_size, generator=generator)
        diff = (traced(check) - model(check)).abs().max().item()
    if diff > TOLERANCE:
        raise UserError(f"{cfg['model']['model_flow_path']}: the traced model differs from the eager one on a new "
                        f"input (max abs difference {diff:.3g} > {TOLERANCE}); forward probably has "
                        "data-dependent control flow, which tracing cannot capture")
    out_dir = path.parent / "jit"
    shape = "x".join(map(str, args.input_size))
    model_path = out_dir / f"{path.stem}_traced.pt"
    input_path = out_dir / f"{path.stem}_input_{shape}.raw"
    atomic_write(model_path, lambda f: torch.jit.save(traced, f))
    raw = example.contiguous().numpy().astype("float32").tobytes(order="C")
    atomic_write(input_path, lambda f: f.write(raw))
    print(f"traced {path.name}: max abs difference to eager {diff:.2e}")
    print(f"saved {model_path}\nsaved {input_path} (float32, C order, shape {shape})")


if __name__ == "__main__":
    run_main(main)
