"""jit_trace_model.py's exports that fit a device, in-process on the toy GAN trained for one epoch:
--dynamic-batch artifacts of each format loaded back from their files and run at batch 1 and 7,
one .json per artifact (so exports of several formats and shapes keep their own descriptions),
the refusal of a flow that fixes the batch size, the peak memory --benchmark reports, and the
message when ONNX Runtime is missing. (test_cli.py runs the script itself: fixed shapes, each
format against eager, data-dependent control flow.)"""
import importlib.util
import json
import re
import sys

import numpy as np
import pytest
import torch

import jit_trace_model
import train
from conftest import SRC, TRAIN_CFG, checkpoints, newest_run
from dataset_base import load_streams
from engine import config, runs
from engine.errors import UserError

ONNX_READY = all(importlib.util.find_spec(name) for name in jit_trace_model.ONNX_PACKAGES)
SUFFIX = jit_trace_model.FORMATS
BATCHES = (1, 7)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy GAN trained for one epoch into a folder of its own: (--set of that folder, checkpoint)."""
    folder = tmp_path_factory.mktemp("exports") / "toy"  # an absolute save_folder_name: nothing in the source tree
    save = f"saving.save_folder_name={folder}"
    train.main(["-t", str(SRC / TRAIN_CFG), "--set", "training.n_epochs=1", "--set", save,
                "--set", "logging.tensorboard=false"])
    return save, checkpoints(newest_run(folder))[-1]


def export(toy, *args):
    """jit_trace_model.py -t <toy config> -c latest <args>, in this process; the jit/ folder."""
    save, checkpoint = toy
    jit_trace_model.main(["-t", str(SRC / TRAIN_CFG), "--set", save, "-c", "latest", *args])
    return checkpoint.parent / "jit"


def loaded(path, fmt):
    """The artifact at `path`, loaded as a device would load it: a function of one tensor."""
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    if fmt == "export":
        return torch.export.load(str(path)).module()
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def eager(checkpoint):
    _, model, _, _ = runs.load_trained_run(SRC / TRAIN_CFG, str(checkpoint), "checkpoint")
    return model.eval()


@pytest.mark.parametrize("fmt", ["torchscript", "export",
                                 pytest.param("onnx", marks=[pytest.mark.slow, pytest.mark.skipif(
                                     not ONNX_READY, reason="needs onnx, onnxscript and onnxruntime")])])
def test_a_dynamic_batch_artifact_runs_at_any_batch_from_its_file(toy, fmt):
    """--dynamic-batch, example batch 1: the file, loaded back, takes batch 1 and 7; each sample's
    output in the batch of 7 is its output alone and the eager one. Its .json says the batch is open."""
    jit = export(toy, "-i", "1", "1", "4", "4", "--dynamic-batch", "--format", fmt)
    artifact = jit / f"{toy[1].stem}_Nx1x4x4{SUFFIX[fmt]}"
    run_artifact = loaded(artifact, fmt)
    x = torch.randn(7, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        together = run_artifact(x)
        alone = torch.cat([run_artifact(x[i:i + 1]) for i in range(7)])
        expected = eager(toy[1])(x)
    assert together.shape == (7, 1, 4, 4)
    torch.testing.assert_close(together, alone, rtol=0, atol=jit_trace_model.TOLERANCE)
    torch.testing.assert_close(together, expected, rtol=0, atol=jit_trace_model.TOLERANCE)
    sidecar = json.loads((jit / f"{artifact.name}.json").read_text())
    assert sidecar["format"] == fmt and sidecar["model"] == artifact.name and sidecar["dynamic_batch"] is True
    assert sidecar["shape"] == [None, 1, 4, 4] and sidecar["batch_sizes_checked"] == list(BATCHES)
    assert sidecar["max_abs_difference_to_eager"] <= jit_trace_model.TOLERANCE
    raw = np.fromfile(jit / sidecar["example_input"], dtype=np.float32)
    assert sidecar["example_input_shape"] == [1, 1, 4, 4] and raw.size == 16


def test_every_artifact_has_its_own_json(toy):
    """Two formats of one shape, a dynamic batch and another shape: four artifacts, each with a .json
    naming its own format, file and shape; one raw example input per shape."""
    stem = toy[1].stem
    runs_of = {f"{stem}_2x1x4x4_traced.pt": ["-i", "2", "1", "4", "4"],
               f"{stem}_2x1x4x4_exported.pt2": ["-i", "2", "1", "4", "4", "--format", "export"],
               f"{stem}_Nx1x4x4_traced.pt": ["-i", "2", "1", "4", "4", "--dynamic-batch"],
               f"{stem}_3x1x4x4_traced.pt": ["-i", "3", "1", "4", "4"]}
    for args in runs_of.values():
        jit = export(toy, *args)
    for name, args in runs_of.items():
        sidecar = json.loads((jit / f"{name}.json").read_text())
        fmt = args[args.index("--format") + 1] if "--format" in args else "torchscript"
        dynamic = "--dynamic-batch" in args
        assert (sidecar["model"], sidecar["format"], sidecar["dynamic_batch"]) == (name, fmt, dynamic), sidecar
        assert sidecar["shape"] == [None if dynamic else int(args[1]), 1, 4, 4]
        assert sidecar["batch_sizes_checked"] == ([1, 2, 7] if dynamic else [int(args[1])])
        assert sidecar["example_input"] == f"{stem}_input_{args[1]}x1x4x4.raw" and sidecar["dtype"] == "float32"
    assert {p.name for p in jit.glob("*.raw")} >= {f"{stem}_input_2x1x4x4.raw", f"{stem}_input_3x1x4x4.raw"}


def test_the_batch_alone_exports_the_data_s_first_samples(toy):
    """-i 2 says what -i 2 1 4 4 says (the names carry the whole shape), and the example input is the
    first 2 samples of the input stream, as evaluation reads them, not numbers of chance."""
    jit = export(toy, "-i", "2")
    stem = toy[1].stem
    sidecar = json.loads((jit / f"{stem}_2x1x4x4_traced.pt.json").read_text())
    assert sidecar["example_input"] == f"{stem}_input_2x1x4x4.raw" and sidecar["example_input_shape"] == [2, 1, 4, 4]
    assert sidecar["inputs"][0]["example_input_from"] == "the first samples of dataset.gen_inputs"
    cfg = config.load_training_config(SRC / TRAIN_CFG, [toy[0]])
    expected = load_streams(cfg["dataset"], cfg["training"]["seed"], "cfg")["gen_inputs"][:2]
    raw = np.fromfile(jit / sidecar["example_input"], dtype=np.float32).reshape(2, 1, 4, 4)
    assert torch.equal(torch.from_numpy(raw), expected)


def test_a_batch_alone_too_big_for_the_model_is_refused_before_the_data_is_read(toy):
    """-i 20000000: the batch alone, times the 16 values of a sample, is past 2^28."""
    with pytest.raises(UserError, match=r"^--input_size 20000000: an example input of 3\.20e\+8 values"):
        export(toy, "-i", "20000000")


FLOWS = {  # forward of the toy GAN, spoilt for a dynamic batch
    "fixed_batch": "return self.generate(inputs).view(2, -1).view(2, 1, 4, 4)  # the batch of -i 2, as a constant",
    "batch_statistics": "return self.generate(inputs) - self.generate(inputs).mean(0)  # minus the batch's mean",
}
FLOW = """from engine.model_base import PyNet


class Spoilt(PyNet):
    def generate(self, inputs):
        skips, generator = {{}}, self.model_components["generator"]
        return generator["gen_dec"](generator["gen_cnn"](inputs, skips), skips)

    def forward(self, inputs):
        {body}
"""


@pytest.mark.parametrize("flow, fmt, says", [
    ("fixed_batch", "export", "torch.export cannot leave the batch size open"),  # the export itself fails
    ("fixed_batch", "torchscript", "the eager model fails at batch 1"),  # the trace runs only at its own batch
    ("batch_statistics", "torchscript", "a sample's output in a batch of 7 differs from its output alone"),
])
def test_a_flow_that_fixes_the_batch_is_refused_with_nothing_written(toy, tmp_path, flow, fmt, says):
    path = tmp_path / f"{flow}.py"
    path.write_text(FLOW.format(body=FLOWS[flow]))
    jit = toy[1].parent / "jit"
    before = sorted(jit.iterdir()) if jit.exists() else []
    with pytest.raises(UserError) as error:
        export(toy, "-i", "2", "1", "4", "4", "--dynamic-batch", "--format", fmt,
               "--set", f"model.model_flow_path={path}")
    message = str(error.value)
    assert message.startswith(f"{path}: --dynamic-batch: ") and says in message, message
    assert "drop --dynamic-batch" in message
    assert (sorted(jit.iterdir()) if jit.exists() else []) == before


def test_peak_memory_on_the_cpu_counts_what_a_pass_holds_at_once():
    """The sum and the product are held together at the peak; the input, allocated before, is not counted."""
    x = torch.randn(1000)
    assert jit_trace_model.peak_memory(lambda x: (x + x) * x, x, torch.device("cpu")) == 2 * x.nbytes
    assert jit_trace_model.peak_memory(lambda x: x.view(10, 100), x, torch.device("cpu")) == 0


def test_benchmark_reports_latency_and_peak_memory(toy, capsys):
    export(toy, "-i", "4", "1", "4", "4", "--format", "export", "--dynamic-batch", "--benchmark", "5")
    out = capsys.readouterr().out
    assert re.search(r"^latency on cpu, batch 4, 5 runs after warm-up:$", out, re.M), out
    assert re.search(r"^peak memory on cpu, batch 4: .*forward pass", out, re.M), out
    assert "measured by torch.profiler" in out
    for name in ("eager", "export"):
        assert re.search(rf"^  {name} +median +[0-9.]+ ms +p90 +[0-9.]+ ms$", out, re.M), out
        peak = re.search(rf"^  {name} +([0-9.]+) (B|KiB|MiB)$", out, re.M)
        assert peak and float(peak[1]) > 0, out


def test_onnx_without_onnxruntime_names_the_pip_command(toy, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    jit = toy[1].parent / "jit"
    before = sorted(jit.iterdir()) if jit.exists() else []
    with pytest.raises(UserError, match=re.escape("(pip install onnx onnxscript onnxruntime)")) as error:
        export(toy, "-i", "1", "1", "4", "4", "--format", "onnx", "--dynamic-batch")
    assert str(error.value).startswith("--format onnx: needs the onnx, onnxscript and onnxruntime packages")
    assert (sorted(jit.iterdir()) if jit.exists() else []) == before
