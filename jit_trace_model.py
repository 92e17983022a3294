"""Export a trained model's inference path for profiling on a device: TorchScript, torch.export or ONNX.

    python jit_trace_model.py -t configs/example_model/example_training_cfg.yaml -c latest -i 1 1 4 4

Writes, under the checkpoint's folder, names carrying the input shape (here 1x1x4x4), so that
exports for other shapes add files rather than replace them:
- jit/<checkpoint>_1x1x4x4_traced.pt (torch.jit.load-able; the default format), or
  _1x1x4x4_exported.pt2 (torch.export.load; --format export), or _1x1x4x4.onnx (--format onnx,
  needs onnx, onnxscript and onnxruntime); with --dynamic-batch the batch is left open and the
  name says so: _Nx1x4x4_traced.pt, ...;
- beside each artifact, <artifact file name>.json: its format, input shape (batch null when
  dynamic), dtype, layout, input stream, checkpoint, the batch sizes it was checked at and its
  largest difference to eager, so that each format keeps its own description;
- jit/<checkpoint>_input_1x1x4x4.raw: the example input, raw values in C order (float32; int64 for
  a stream the architecture declares int64), to feed the model on the device.
The example input is the first samples of the input stream in the training config's data (as
evaluation sees them), so that it is valid for the model (class indices in range, say); where the
data cannot be read, a float stream's is drawn from N(0, 1) instead (a note says so), an integer
one's never is. Every artifact is checked against the eager model on fresh inputs (float streams
N(0, 1), integer streams samples of the data) before anything is written: at the given batch, or
with --dynamic-batch at batches 1 and 7 (and the given one), each sample of the batch of 7 also
giving what it gives alone. --benchmark N times eager against the artifact on this machine
(--device cpu or cuda) and measures the peak memory of one forward pass.

A model that reads several data streams (noise [16], then int64 class labels [], say) takes one
tensor per stream, in the order its architecture first reads them (PyNet.input_keys). -i gives
the first stream's shape, batch first, or the batch size alone (-i 1); the others' per-sample
shapes come from the architecture, and all share the batch (with --dynamic-batch, one open
batch). Its file names give each stream as <stream>-<shape>, joined by _:
  jit/<checkpoint>_noise-1x16_labels-1_traced.pt   (_noise-Nx16_labels-N_... with --dynamic-batch)
  jit/<checkpoint>_input_noise-1x16.raw and jit/<checkpoint>_input_labels-1.raw (one a stream)
and the .json lists every stream under "inputs".
"""
from engine.cli import add_training_cfg, answer_early, make_parser

FORMATS = {"torchscript": "_traced.pt", "export": "_exported.pt2", "onnx": ".onnx"}  # --format: file endings
DYNAMIC_CHECK_BATCHES = (1, 7)  # --dynamic-batch: batch sizes every artifact is checked at; the last, per sample too
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # --format onnx: torch.onnx needs the first two


def parse_args(argv):
    parser = make_parser(__doc__.splitlines()[0], "python jit_trace_model.py "
                         "-t configs/example_model/example_training_cfg.yaml -c latest -i 1 1 4 4")
    add_training_cfg(parser)
    parser.add_argument("-c", "--checkpoint", required=True, metavar="PTH",
                        help="checkpoint to export: latest (the newest of the newest run), best (saving.keep_best's), "
                             "a run folder (run_3: "
                             "its newest), a checkpoint file name of one of the runs, or a path")
    parser.add_argument("-i", "--input_size", required=True, nargs="+", type=int, metavar="N",
                        help="shape of the example input, batch first, e.g. 1 1 4 4 (named 1x1x4x4 in the files), or "
                             "the batch size alone (-i 1). A model of several data streams: the first stream's "
                             "shape or the batch size; the others' per-sample shapes come from the architecture "
                             "(see below)")
    parser.add_argument("--format", choices=list(FORMATS), default="torchscript",
                        help="torchscript (torch.jit.trace, the default: jit/<checkpoint>_<shape>_traced.pt), "
                             "export (torch.export: _<shape>_exported.pt2) or onnx (_<shape>.onnx)")
    parser.add_argument("--dynamic-batch", "--dynamic_batch", action="store_true",
                        help="leave the batch size open: the artifact takes any batch (named Nx1x4x4), checked "
                             f"at batches {' and '.join(map(str, DYNAMIC_CHECK_BATCHES))} and the one of -i")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="time N forward passes of the eager model and of the artifact (median, p90) and "
                             "measure the peak memory of one")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="where --benchmark runs: cpu (default) or cuda[:id]; ONNX Runtime runs on the CPU")
    parser.add_argument("--path", metavar="NAME",
                        help="export another inference path the flow names in its `exports` (a VAE's sample: "
                             "latent codes in, images out) instead of forward; its files are named "
                             "<checkpoint>_<NAME>_<shape>...")
    parser.add_argument("--no_ema", action="store_true",
                        help="export the generator's own weights, not their moving average (training.ema_decay)")
    parser.epilog += "\n\n" + __doc__[__doc__.index("A model that reads several"):].strip()
    return parser.parse_args(argv)


answer_early(__name__, parse_args)  # --help in a fraction of a second: before torch is imported

import contextlib
import decimal
import importlib
import inspect
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
import warnings

import torch

from dataset import build_dataset
from dataset_base import load_streams
from engine.config import stream_configs
from engine.errors import UserError, cut, did_you_mean, dtype_name, run_main
from engine.model_base import as_tuple, batch_size_of, index_inputs, inputs_to
from engine.runs import Run, load_trained_run

TOLERANCE = 1e-5  # max abs difference allowed between an artifact's outputs and eager ones
# -i: the most values an example input may hold (1 GiB of float32). The checks run the model on it
# and on a copy, and a trace records the same operations at any batch size, so more buys nothing.
MAX_INPUT_VALUES = 2 ** 28
MAX_BENCHMARK = 10 ** 6  # --benchmark: the most timed passes (a median settles within hundreds)
BAKED_IN = ("forward fixes the batch size, usually by a reshape or view to a fixed size such as x.view(2, -1): "
            "use x.flatten(1) or x.reshape(x.shape[0], -1) there, or drop --dynamic-batch")


class CaptureFailed(Exception):
    """An exporter could not capture forward; the message is the exporter's own first line."""


def main(argv):
    args = parse_args(argv)
    check_numbers(args)
    device = benchmark_device(args.device)
    cfg, model, path, _ = load_trained_run(args.training_cfg, args.checkpoint, "--checkpoint", args.overrides,
                                           use_ema=not args.no_ema)
    model.eval()
    flow_path, dynamic = cfg["model"]["model_flow_path"], args.dynamic_batch
    if args.path is not None:
        model = InferencePath(model, args.path, flow_path)
    batch = example_batch(args.input_size, model)
    check_forward_takes(model, flow_path)
    check_values(batch * sum(math.prod(size) for size in model.input_sizes.values()), args.input_size)
    examples = ExampleInputs(cfg, args.training_cfg, model)
    example = examples.first(batch)
    # torch.export specialises a dimension whose example size is 0 or 1 (a size-1 dimension may be a
    # broadcast), so a symbolic batch traced at batch 1 fails with "Constraints violated": trace at 2 or
    # more (all three formats, so that they capture the same pass)
    traced_at = example if not dynamic or batch >= 2 else examples.first(2)
    run_artifact, write = export(args.format, model, traced_at, example, flow_path, dynamic)
    batches = sorted({batch, *DYNAMIC_CHECK_BATCHES}) if dynamic else [batch]
    record = check_artifact(run_artifact, model, [examples.fresh(n) for n in batches], flow_path, args.format, dynamic)
    artifact_path, written = write_files(Run.of(cfg, folder=path.parent), path, model, args, write, example, record,
                                         examples.origins)
    print(f"{args.format} model of {path.name}{' (any batch size)' if dynamic else ''}: max abs difference to eager "
          f"{record['max_abs_difference_to_eager']:.2e} at batch {listed(batches)}")
    print(f"saved {artifact_path} and its .json")
    for input_path, x in written:
        print(f"saved {input_path} ({dtype_name(x.dtype)}, C order, shape {'x'.join(map(str, x.shape))})")
    if args.benchmark:
        if device.type != "cpu" and args.format != "onnx":
            model, run_artifact = model.to(device), run_artifact.to(device)
        benchmark(model, run_artifact, example, args.benchmark, args.format, device)


def check_numbers(args):
    """-i and --benchmark within what a tensor and a run can hold, before anything is loaded or written."""
    if any(n < 1 for n in args.input_size):
        raise UserError(f"--input_size {cut(' '.join(map(str, args.input_size)))}: every size must be >= 1")
    check_values(math.prod(args.input_size), args.input_size)  # (with the model's other inputs: main)
    if not 0 <= args.benchmark <= MAX_BENCHMARK:
        raise UserError(f"--benchmark {args.benchmark}: give a number of runs from 1 to {MAX_BENCHMARK:,} (or leave "
                        "it out)")


def check_values(values, input_size):
    """An example input of `values` values in all is within MAX_INPUT_VALUES."""
    if values > MAX_INPUT_VALUES:
        values = decimal.Decimal(values)  # (a float cannot hold every product of integers typed)
        raise UserError(f"--input_size {cut(' '.join(map(str, input_size)))}: an example input of {values:.3g} values "
                        f"({values * 4 / 2 ** 30:.3g} GiB of float32) is more than the {MAX_INPUT_VALUES:,} (1 GiB) "
                        "allowed; a trace records the same operations at any batch size: give a batch of 1 (with "
                        "--dynamic-batch for an artifact that takes any batch)")


def example_batch(input_size, model):
    """The example's batch size that -i gives: the first input's shape, batch first, or the batch alone."""
    expected = (input_size[0], *model.input_size)
    if tuple(input_size) == expected or len(input_size) == 1:
        return input_size[0]
    others = [f"{key} {list(model.input_sizes[key])}" for key in model.input_keys[1:]]
    rest = f"; the shapes of its other inputs ({', '.join(others)}) come from the architecture" if others else ""
    raise UserError(f"--input_size {cut(' '.join(map(str, input_size)))}: the model's input "
                    f"'{model.input_key}' has shape {list(model.input_size)} per sample (see "
                    f"{model.architecture_path}); use -i {' '.join(map(str, expected))}, or the batch size alone "
                    f"(-i {input_size[0]}){rest}")


class InferencePath(torch.nn.Module):
    """Another inference path of a flow (--path), as a model whose forward it is: the flow's
    `exports` names the method and its inputs' per-sample shapes ({"sample": {"z": [8]}}), which
    are float streams of no dataset (their examples are drawn from N(0, 1))."""

    def __init__(self, model, name, flow_path):
        super().__init__()
        exports = getattr(type(model), "exports", None) or {}
        if name not in exports or not callable(getattr(model, name, None)):
            valid = ", ".join(exports) or "none (the flow's class has no `exports`)"
            raise UserError(f"--path {name}: not an inference path the flow {type(model).__name__} ({flow_path}) "
                            f"exports{did_you_mean(name, list(exports))}; its paths: {valid}")
        self.model, self.method = model, getattr(model, name)
        self.input_sizes = {key: tuple(size) for key, size in exports[name].items()}
        self.input_keys = tuple(self.input_sizes)
        self.input_dtypes = dict.fromkeys(self.input_keys, torch.float32)
        self.input_key, self.input_size = self.input_keys[0], self.input_sizes[self.input_keys[0]]
        self.architecture_path = f"{flow_path} ({type(model).__name__}.exports['{name}'])"

    def forward(self, *inputs):
        return self.method(*inputs)


def check_forward_takes(model, flow_path):
    """forward takes one tensor per data stream the architecture reads, as the artifact will."""
    try:
        inspect.signature(model.forward).bind(*model.input_keys)
    except TypeError as e:
        raise UserError(f"{flow_path}: {type(model).__name__}.forward must take one tensor per data stream its "
                        f"architecture reads, in this order: {', '.join(model.input_keys)} ({e})") from None


class ExampleInputs:
    """The model's example inputs, in the form its forward takes (a tensor, or a tuple in
    input_keys order). Each stream's come from the training config's data, as evaluation sees it
    (dataset.batch_transforms marked in_evaluation), so that they are valid inputs (class indices
    in range, say): its first samples for the example, which the artifact is traced on and the
    .raw files hold. A float stream whose data cannot be read is drawn from N(0, 1) instead (a note
    says why); an integer stream's (indices) never is. The checks' inputs: float streams N(0, 1),
    integer streams samples of the data at random. `origins`: {stream: where its example came
    from}, for the .json."""

    def __init__(self, cfg, source, model):
        self.model, self.generator = model, torch.Generator().manual_seed(cfg["training"]["seed"])
        self.data, why = readable_data(cfg, source, model)
        self.origins, self.from_data = {}, {}
        for key in model.input_keys:
            problem = why or self.unfit(key)
            if problem and not model.input_dtypes[key].is_floating_point:
                raise UserError(f"{source}: dataset.{key}: the example inputs of {key}, which the architecture "
                                f"declares {dtype_name(model.input_dtypes[key])} (indices), come from the data, but "
                                f"{problem}")
            if problem:
                print(f"note: the example inputs of {key} are drawn from N(0, 1): {problem}", file=sys.stderr)
            self.from_data[key] = not problem
            self.origins[key] = f"N(0, 1): {problem}" if problem else f"the first samples of dataset.{key}"

    def unfit(self, key):
        """Why the data's samples of `key` cannot be the model's inputs, or None."""
        sample = self.data.__getitems__(((0,), torch.arange(1)))[key]
        size, dtype = self.model.input_sizes[key], self.model.input_dtypes[key]
        if tuple(sample.shape[1:]) != size:
            return f"its samples have shape {list(sample.shape[1:])}, the architecture's input_size is {list(size)}"
        if not dtype.is_floating_point and sample.dtype != dtype:
            return f"its samples are {dtype_name(sample.dtype)}, not {dtype_name(dtype)}"
        return None

    def first(self, n):
        """The inputs of the data's first n samples (wrapping around a shorter dataset)."""
        return self.inputs(n, lambda key: self.from_data[key], lambda: torch.arange(n) % len(self.data))

    def fresh(self, n):
        """The inputs of n new samples, for the checks: indices from the data, values N(0, 1)."""
        dtypes = self.model.input_dtypes
        return self.inputs(n, lambda key: not dtypes[key].is_floating_point,
                           lambda: torch.randint(len(self.data), (n,), generator=self.generator))

    def inputs(self, n, from_data, positions):
        """The inputs of n samples: of each stream that `from_data(stream)` picks, the data's samples
        at `positions()` (float ones as float32); of the others, N(0, 1)."""
        keys = self.model.input_keys
        batch = self.data.__getitems__(((0,), positions())) if any(map(from_data, keys)) else {}
        made = []
        for key in keys:
            if not from_data(key):
                made.append(torch.randn([n, *self.model.input_sizes[key]], generator=self.generator))
            else:
                made.append(batch[key].float() if self.model.input_dtypes[key].is_floating_point else batch[key])
        return made[0] if len(made) == 1 else tuple(made)


def readable_data(cfg, source, model):
    """(the evaluation view of the training config's dataset, None), or (None, why it cannot be
    read: a file missing, a stream the model reads that it lacks, a transform that fails)."""
    missing = [key for key in model.input_keys if key not in stream_configs(cfg["dataset"])]
    if missing:
        return None, f"{source}: dataset has no stream {', '.join(missing)}"
    try:
        streams = load_streams(cfg["dataset"], cfg["training"]["seed"], source)
        n = len(streams[cfg["dataset"]["data_len_key"]])
        data = build_dataset(streams, cfg["dataset"], torch.arange(n), False, f"{source}: dataset")
        data.__getitems__(((0,), torch.arange(1)))  # (its transforms run)
    except UserError as e:
        return None, str(e)
    return data, None


def export(fmt, model, traced_at, example, flow_path, dynamic):
    """(run, write) of the artifact of `fmt`, traced at `traced_at`; a capture that fails is a UserError."""
    try:
        return EXPORTERS[fmt](model, traced_at, dynamic)
    except CaptureFailed as e:
        failed = e
    if dynamic and exports_fixed(fmt, model, example):
        raise UserError(f"{flow_path}: --dynamic-batch: {ENGINES[fmt]} cannot leave the batch size open ({failed}); "
                        f"{BAKED_IN}") from None
    raise UserError(f"{flow_path}: {CAPTURE_FAILED[fmt].format(failed)}") from None


def exports_fixed(fmt, model, example):
    """Whether forward exports at the fixed shape of `example`, telling a baked-in batch from a flow
    that cannot be exported at all."""
    try:
        EXPORTERS[fmt](model, example, False)
    except CaptureFailed:
        return False
    return True


def check_artifact(run_artifact, model, inputs, flow_path, fmt, dynamic):
    """What the checks found, for the .json: the artifact against eager on `inputs` (one per batch size)
    and, with a dynamic batch, the samples of the batch of DYNAMIC_CHECK_BATCHES[-1] against each alone."""
    batches = [batch_size_of(x) for x in inputs]
    record = {"max_abs_difference_to_eager": difference_to_eager(run_artifact, model, inputs, flow_path, fmt, dynamic),
              "batch_sizes_checked": batches}
    if dynamic:
        together = inputs[batches.index(DYNAMIC_CHECK_BATCHES[-1])]
        record["max_abs_difference_batched_to_alone"] = batched_to_alone(run_artifact, together, flow_path, fmt)
    return record


def difference_to_eager(run_artifact, model, inputs, flow_path, fmt, dynamic):
    """The largest abs difference between the artifact's and the eager model's outputs over `inputs`."""
    worst = 0.0
    for x in inputs:
        at = f"at batch {batch_size_of(x)}"
        expected = forward(model, x, f"the eager model fails {at}", flow_path, dynamic)
        got = forward(run_artifact, x, f"the {fmt} model fails {at}", flow_path, dynamic)
        if got.shape != expected.shape:
            raise UserError(f"{flow_path}: {'--dynamic-batch: ' if dynamic else ''}{at} the {fmt} model gives shape "
                            f"{list(got.shape)}, the eager one {list(expected.shape)}; "
                            + (BAKED_IN if dynamic else "the output's shape depends on the data, which tracing fixes"))
        diff = max_difference(got, expected)
        if not diff <= TOLERANCE:  # (NaN where the other has a number is a difference too)
            raise UserError(f"{flow_path}: the {fmt} model differs from the eager one on a new input {at} (max abs "
                            f"difference {diff:.3g} > {TOLERANCE}); forward probably has data-dependent control "
                            "flow, which tracing cannot capture" + (f", or {BAKED_IN}" if dynamic else ""))
        worst = max(worst, diff)
    return worst


def max_difference(a, b):
    """The largest abs difference between two outputs, NaN where one is NaN and the other is not
    (where both are, they agree)."""
    return (a - b).abs().masked_fill(a.isnan() & b.isnan(), 0).max().item()


def forward(fn, x, failed, flow_path, dynamic):
    """fn(*x) (x: the model's inputs, a tensor or a tuple); with --dynamic-batch, a failure at a batch
    size other than the traced one is a UserError (without it, the batch is the traced one, so a
    failure is a bug and shows its traceback)."""
    try:
        with torch.no_grad():
            return fn(*as_tuple(x))
    except Exception as e:
        if not dynamic:
            raise
        raise UserError(f"{flow_path}: --dynamic-batch: {failed} ({first_line(e)}); {BAKED_IN}") from None


def batched_to_alone(run_artifact, x, flow_path, fmt):
    """The largest abs difference between each sample's output in the batch `x` and its output when
    run alone (batch 1): outputs that depend on the batch size make a dynamic batch wrong."""
    n = batch_size_of(x)
    with torch.no_grad():
        together = run_artifact(*as_tuple(x))
        alone = torch.cat([run_artifact(*as_tuple(index_inputs(x, slice(i, i + 1)))) for i in range(n)])
    if together.shape != alone.shape:
        raise UserError(f"{flow_path}: --dynamic-batch: the {fmt} model gives {together.shape[0]} output(s) for a "
                        f"batch of {n} (shape {list(together.shape)}); {BAKED_IN}")
    diff = max_difference(together, alone)
    if not diff <= TOLERANCE:
        raise UserError(f"{flow_path}: --dynamic-batch: a sample's output in a batch of {n} differs from "
                        f"its output alone (max abs difference {diff:.3g} > {TOLERANCE}): forward mixes the samples "
                        "of a batch (a reshape across the batch dimension, or batch statistics); fix forward or "
                        "drop --dynamic-batch")
    return diff


def write_files(run, path, model, args, write, example, record, origins):
    """Write the artifact, its .json and a raw example input a stream (atomically, each); the
    artifact's path and [(raw file path, its example input)]."""
    examples = dict(zip(model.input_keys, as_tuple(example)))
    batch = "N" if args.dynamic_batch else str(batch_size_of(example))
    stem = f"{path.stem}_{args.path}" if args.path else path.stem  # (--path: its own files)
    artifact_path = run.write_export(f"{stem}_{shape_tag(model, batch)}{FORMATS[args.format]}", write)  # jit/
    inputs, written = [], []
    for key, x in examples.items():
        raw = x.contiguous().numpy().tobytes(order="C")  # float32, or int64 where the architecture declares it
        input_path = run.write_export(f"{stem}_input_{shape_tag(model, str(x.shape[0]), [key])}.raw",
                                      lambda f, raw=raw: f.write(raw))
        written.append((input_path, x))
        inputs.append({"name": key, "shape": [None if args.dynamic_batch else x.shape[0], *model.input_sizes[key]],
                       "dtype": dtype_name(x.dtype), "example_input": input_path.name,
                       "example_input_shape": list(x.shape), "example_input_from": origins[key]})
    first = inputs[0]  # (the keys of the time when a model read one stream, kept: the first stream's)
    sidecar = {"format": args.format, "model": artifact_path.name, "checkpoint": path.name, "input": first["name"],
               "shape": first["shape"],  # null: any batch
               "dynamic_batch": args.dynamic_batch, "dtype": first["dtype"],
               "layout": "C order (row-major), batch first", "example_input": first["example_input"],
               "example_input_shape": first["example_input_shape"], "inputs": inputs, **record}
    text = json.dumps(sidecar, indent=2).encode()
    run.write_export(f"{artifact_path.name}.json", lambda f: f.write(text))
    return artifact_path, written


def shape_tag(model, batch, keys=None):
    """How file names carry the input shape, batch `batch` (a number, or N): 1x1x4x4 for a model
    of one stream; for several, each stream `keys` (all by default) as <stream>-<shape>, joined by
    _ (noise-1x16_labels-1)."""
    if len(model.input_keys) == 1:
        return "x".join([batch, *map(str, model.input_size)])
    return "_".join(f"{key}-{'x'.join([batch, *map(str, model.input_sizes[key])])}"
                    for key in keys or model.input_keys)


def listed(numbers):
    """[1, 7, 64] as "1, 7 and 64"."""
    return " and ".join(filter(None, [", ".join(map(str, numbers[:-1])), str(numbers[-1])]))


def first_line(error):
    """The first line of an exception's message, without terminal colours (torch.onnx adds them)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def batch_dim():
    """The symbolic batch of torch.export and torch.onnx. min=1: the program also takes batch 1,
    although it was traced at 2 or more (see main); the checks then run it at batch 1 and 7."""
    return torch.export.Dim("batch", min=1)


def to_torchscript(model, example, dynamic):
    print("note: PyTorch marks TorchScript as deprecated in favour of torch.export (--format export); the "
          "traced model still loads with torch.jit.load and in LibTorch.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")  # said once, above
    # A trace records the ops run on `example`, sizes read with x.shape[0] included, so it usually runs
    # at other batch sizes too; sizes written as constants stay constant, which the checks catch
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model, as_tuple(example))
    except Exception as e:
        raise CaptureFailed(first_line(e)) from None
    return traced, lambda f: torch.jit.save(traced, f)


def batch_shapes(model, example):
    """torch.export's dynamic_shapes that leave dim 0 of every input open, one batch for all: by
    forward's parameter names, as a *inputs parameter (PyNet's default forward) takes a tuple."""
    batch, signature = batch_dim(), inspect.signature(model.forward)
    varargs = inspect.Parameter.VAR_POSITIONAL
    return {name: tuple({0: batch} for _ in value) if signature.parameters[name].kind is varargs else {0: batch}
            for name, value in signature.bind(*as_tuple(example)).arguments.items()}


def to_export(model, example, dynamic):
    try:
        shapes = batch_shapes(model, example) if dynamic else None
        exported = torch.export.export(model, as_tuple(example), dynamic_shapes=shapes)
    except Exception as e:  # torch.export names the line it cannot capture
        raise CaptureFailed(first_line(e)) from None
    return exported.module(), lambda f: torch.export.save(exported, f)


def to_onnx(model, example, dynamic):
    try:
        onnxruntime = [importlib.import_module(name) for name in ONNX_PACKAGES][-1]
    except ImportError:
        raise UserError(f"--format onnx: needs the {', '.join(ONNX_PACKAGES[:-1])} and {ONNX_PACKAGES[-1]} packages "
                        f"(pip install {' '.join(ONNX_PACKAGES)})") from None
    try:
        shapes = batch_shapes(model, example) if dynamic else None
        # several streams: inputs named after them, rather than after forward's *inputs (inputs_0, ...)
        names = list(model.input_keys) if len(model.input_keys) > 1 else None
        program = torch.onnx.export(model, as_tuple(example), dynamo=True, dynamic_shapes=shapes, input_names=names)
    except Exception as e:  # its own message says which step failed; the reason is in the one it wraps
        raise CaptureFailed(first_line(e.__cause__ or e)) from None
    data = program.model_proto.SerializeToString()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # fatal only: a run that fails at another batch size is reported as a UserError
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = [given.name for given in session.get_inputs()]  # (forward's inputs, in order)

    def run(*xs):
        return torch.from_numpy(session.run(None, {name: x.numpy() for name, x in zip(names, xs)})[0])

    return run, lambda f: f.write(data)


EXPORTERS = {"torchscript": to_torchscript, "export": to_export, "onnx": to_onnx}
ENGINES = {"torchscript": "torch.jit.trace", "export": "torch.export", "onnx": "torch.onnx.export"}
CAPTURE_FAILED = {"torchscript": "torch.jit.trace cannot trace forward ({})",
                  "export": "torch.export cannot capture forward ({}); data-dependent control flow is the usual "
                            "cause (see torch.cond)",
                  "onnx": "ONNX export failed: {}"}


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
    """Latency and peak memory of eager and of the artifact: a first look before profiling on the device."""
    results, peaks = {}, {}
    on = torch.device("cpu") if fmt == "onnx" else device  # ONNX Runtime here runs on the CPU provider
    for name, model_fn, where in (("eager", model, device), (fmt, run_artifact, on)):
        x = inputs_to(example, where)

        def fn(x, model_fn=model_fn):  # (the model's inputs, a tensor or a tuple, as its arguments)
            return model_fn(*as_tuple(x))

        for _ in range(max(3, n // 10)):  # warm-up
            fn(x)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn(x)
            if where.type == "cuda":
                torch.cuda.synchronize(where)  # the GPU runs asynchronously: wait for the result
            times.append(time.perf_counter() - start)
        times.sort()
        results[name] = (statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))])
        peaks[name] = None if name == "onnx" else peak_memory(fn, x, where)
    print(f"latency on {device}{' (ONNX Runtime on the CPU)' if fmt == 'onnx' and device.type != 'cpu' else ''}, "
          f"batch {batch_size_of(example)}, {n} runs after warm-up:")
    for name, (median, p90) in results.items():
        print(f"  {name:<12} median {median * 1e3:8.3f} ms   p90 {p90 * 1e3:8.3f} ms")
    print(f"  eager / {fmt}: {results['eager'][0] / results[fmt][0]:.2f}x (median)")
    print(f"peak memory on {device}, batch {batch_size_of(example)}: the most bytes of tensors held at once during one "
          "forward pass (output included; weights and input not)")
    print(f"  measured by {MEMORY_MEASURE[device.type]}")
    for name, peak in peaks.items():
        print(f"  {name:<12} {size_text(peak) if peak is not None else 'n/a':>10}"
              + ("   (ONNX Runtime allocates outside torch, which cannot see it)" if peak is None else ""))


MEMORY_MEASURE = {"cuda": "torch.cuda.max_memory_allocated, less memory_allocated before the pass",
                  "cpu": "torch.profiler (torch's CPU allocator; buffers a library allocates itself are not seen)"}


def peak_memory(fn, x, device):
    """Bytes at the peak of one fn(x) above what was allocated when it began, or None if unmeasured.

    On a GPU, the CUDA caching allocator's counters give it. On the CPU torch keeps no such counter,
    and the process's resident size cannot single out one pass: its peak (VmHWM) covers everything
    since start-up, and memory freed and reused inside the process never shows as growth. So
    torch.profiler with profile_memory records each allocation and free of a tensor, and their
    running sum over the pass gives its peak."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(x)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    activities = [torch.profiler.ProfilerActivity.CPU]
    with quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn(x)
    try:  # the profiler's raw events: the public summaries add allocations up, losing when each was freed
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        return max(itertools.accumulate(e.nbytes() for e in events), default=0)
    except AttributeError:  # another torch: say "n/a" rather than guess
        return None


@contextlib.contextmanager
def quiet_stderr():
    """Send file descriptor 2 to /dev/null: the profiler's C++ backend (Kineto) logs its start and stop
    there, in the middle of the table. Only the profiled pass runs inside; it ran before, in the timing."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def size_text(n):
    """Bytes as B, KiB or MiB, for the memory table."""
    for unit, scale in (("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


if __name__ == "__main__":
    run_main(main)
