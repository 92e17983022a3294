"""Models that read several data streams, integer streams with an Embedding, and layer
parametrizations (spectral_norm, ...): the architecture's checks, PyNet's default paths and the
helpers for inputs of either form, and the scripts that take such a model (evaluate.py,
jit_trace_model.py) on a class-conditional GAN whose checkpoint is written here, untrained.
(Training one is the trainer's part; a spectral-normed discriminator trains at the end.)"""
import importlib.util
import json
import textwrap

import numpy as np
import pytest
import torch
import yaml
from torch.optim.swa_utils import AveragedModel

import evaluate
import jit_trace_model
import train
from conftest import ARCH_YAML, SRC, TRAIN_CFG, checkpoints, newest_run
from dataset import build_dataset
from dataset_base import load_streams
from engine import cli, config, model_base, preflight
from engine.errors import UserError
from engine.model_base import (
    as_tuple,
    batch_size_of,
    index_inputs,
    inputs_to,
    map_inputs,
    run_model,
    split_inputs,
)

ONNX_READY = all(importlib.util.find_spec(name) for name in jit_trace_model.ONNX_PACKAGES)
SHAPES = SRC / "data/shape_classifier/shapes_16x16.npz"  # 3000 16x16 images and their class labels
N_SAMPLES = 40

# A class-conditional GAN as docs/architecture.md writes it: the generator embeds a class label a
# sample and reads noise beside it; the discriminator embeds the label too (a conditional one).
CGAN_ARCH = """
model_components:
  generator: {submodels: [label_embed, gen_fc]}
  discriminator: {adv_type: discriminator, submodels: [disc_embed, disc]}
label_embed:
  submodel_input: {input_data: {data_key: labels, input_size: [], dtype: int64}}
  layers:
    - {Embedding: {num_embeddings: 3, embedding_dim: 8}}
gen_fc:
  submodel_input: {input_data: {data_key: noise, input_size: [16]}, label_embed: output}
  layers:
    - {Linear: {out_features: 32}, parametrization: spectral_norm}
    - {ReLU: null}
    - {layer_type: Linear, layer_params: {out_features: 256}, parametrization: {weight_norm: {dim: 0}}}
    - {Unflatten: {dim: 1, unflattened_size: [1, 16, 16]}}
    - {Tanh: null}
disc_embed:
  submodel_input: {input_data: {data_key: labels, input_size: [], dtype: long}}
  layers:
    - {Embedding: {num_embeddings: 3, embedding_dim: 256}}
    - {Unflatten: {dim: 1, unflattened_size: [1, 16, 16]}}
disc:
  submodel_input: {gen_fc: output, disc_embed: output}
  layers:
    - {Conv2d: {out_channels: 4, kernel_size: 4, stride: 2, padding: 1}, parametrization: spectral_norm}
    - {LeakyReLU: {negative_slope: 0.2}}
    - {Flatten: null}
    - {layer_type: Linear, layer_params: {out_features: 1},
       parametrization: {spectral_norm: {n_power_iterations: 2}}}
"""
FLOW = """from engine.model_base import PyNet


class ConditionalGAN(PyNet):  # PyNet's default forward and discriminate, for any number of streams
    target_key = "images"
"""


def stream(**fields):
    return {"n_inputs": N_SAMPLES, **fields}


def cgan_config(folder, **dataset_changes):
    """The toy config turned into the conditional GAN's, run folders under `folder`."""
    cfg = yaml.safe_load((SRC / TRAIN_CFG).read_text())
    cfg["model"] = {"architecture_cfg_path": str(folder / "cgan.yaml"), "model_flow_path": str(folder / "cgan.py"),
                    "model_checkpoint_filename": None}
    cfg["saving"] |= {"save_folder_name": str(folder / "runs"), "save_filename_prefix": "cgan"}
    cfg["sample_metrics"]["feature_extractor"] = "pixels"
    npz = {"data_read_type": "file", "data_path": str(SHAPES), "file_reader": "read_npz"}
    cfg["dataset"] = {
        "data_len_key": "images",
        "noise": stream(data_read_type="function", data_generating_function="random_normal",
                        data_generating_function_args={"shape": [16]}),
        "labels": stream(**npz, file_reader_args={"key": "labels", "dtype": "int64"}),
        "images": stream(**npz, file_reader_args={"key": "images"}, data_read_postprocessing_fn="scale_to_symmetric",
                         data_read_postprocessing_fn_args={"low": 0, "high": 255}, value_range=[-1, 1]),
    }
    for name, changes in dataset_changes.items():
        cfg["dataset"][name] |= changes
    path = folder / f"cgan_cfg_{len(list(folder.glob('cgan_cfg_*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def cgan(tmp_path_factory):
    """(folder, training config, checkpoint) of the conditional GAN, its weights as built (seed 0)."""
    folder = tmp_path_factory.mktemp("cgan")
    (folder / "cgan.yaml").write_text(CGAN_ARCH)
    (folder / "cgan.py").write_text(FLOW)
    cfg = cgan_config(folder)
    torch.manual_seed(0)
    model = model_base.PyNet(folder / "cgan.yaml")
    run = folder / "runs" / "run_1"
    run.mkdir(parents=True)
    path = run / "cgan_epoch0_20250101-000000.pth"
    torch.save({"model_state_dict": model.state_dict(), "epoch": 0, "architecture": CGAN_ARCH,
                "config": (SRC / TRAIN_CFG).read_text()}, path)
    return folder, cfg, path


def cgan_model(cgan):
    """The conditional GAN's flow, built as train.py builds it (seed 0: the checkpoint's weights)."""
    torch.manual_seed(0)
    folder = cgan[0]
    return model_base.build_model({"model_flow_path": str(folder / "cgan.py"),
                                   "architecture_cfg_path": str(folder / "cgan.yaml")})


def first_samples():
    """The data's first N_SAMPLES labels, as the npz holds them."""
    with np.load(SHAPES) as data:
        return torch.from_numpy(data["labels"][:N_SAMPLES])


def arch_file(tmp_path, text):
    path = tmp_path / "arch.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def refused(tmp_path, text):
    """(the architecture's path, the message of the UserError that building it raises)."""
    path = arch_file(tmp_path, text)
    with pytest.raises(UserError) as e:
        model_base.PyNet(path)
    return str(path), str(e.value)


# ---- 1. several data streams ---------------------------------------------------------------------
def test_streams_are_the_model_inputs_in_the_order_submodels_first_read_them(cgan):
    model = cgan_model(cgan)
    assert model.input_keys == ("labels", "noise")
    assert model.input_sizes == {"labels": (), "noise": (16,)}
    assert model.input_dtypes == {"labels": torch.int64, "noise": torch.float32}  # `long` is int64 too
    assert (model.input_key, model.input_size) == ("labels", ())
    table = model.summary()
    assert "labels (int64)" in table and "noise, label_embed" in table  # what each submodel reads


def test_default_forward_and_discriminate_take_one_tensor_per_stream(cgan):
    """forward(labels, noise) runs label_embed then gen_fc; discriminate gets the same inputs as a
    tuple, and its own embedding of the labels changes the scores."""
    model = cgan_model(cgan).eval()
    labels, noise = torch.tensor([0, 1, 2, 1]), torch.randn(4, 16)
    out = model(labels, noise)
    sub = model.submodels
    expected = sub["gen_fc"](torch.cat([noise, sub["label_embed"](labels)], 1))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    scores = model.discriminate(out, (labels, noise))
    assert scores.shape == (4, 1)
    other = model.discriminate(out, (torch.tensor([2, 0, 1, 0]), noise))
    assert not torch.equal(scores, other)


def test_inputs_in_the_wrong_order_or_number_say_the_order(cgan):
    model = cgan_model(cgan)
    labels, noise = torch.tensor([0, 1]), torch.randn(2, 16)
    with pytest.raises(TypeError, match="inputs go in input_keys order: labels, noise"):
        model(noise, labels)
    with pytest.raises(TypeError, match=r"takes 2 input\(s\), one tensor per data stream \(labels, noise\)"):
        model(noise)


def test_split_batch_gives_a_tuple_for_several_streams_and_the_tensor_for_one(cgan):
    model = cgan_model(cgan)
    batch = {"noise": torch.randn(3, 16), "labels": torch.tensor([0, 1, 2]), "images": torch.zeros(3, 1, 16, 16)}
    inputs, targets = model.split_batch(batch)
    assert isinstance(inputs, tuple) and inputs[0] is batch["labels"] and inputs[1] is batch["noise"]
    assert targets is batch["images"]
    toy = model_base.PyNet(SRC / ARCH_YAML)  # one stream: the tensor itself, as before
    one = {"gen_inputs": torch.randn(3, 1, 4, 4)}
    assert toy.split_batch(one)[0] is one["gen_inputs"]


# ---- 2. helpers for inputs of either form ------------------------------------------------------
@pytest.mark.parametrize("form", ["tensor", "tuple"])
def test_input_helpers_keep_the_form_they_are_given(form):
    x, y = torch.arange(10.0).view(5, 2), torch.arange(5)
    inputs = x if form == "tensor" else (x, y)
    assert as_tuple(inputs) == ((x,) if form == "tensor" else (x, y))
    assert batch_size_of(inputs) == 5
    parts = split_inputs(inputs, 2)
    assert [batch_size_of(p) for p in parts] == [2, 2, 1]
    assert all(isinstance(p, torch.Tensor) == (form == "tensor") for p in parts)
    picked = index_inputs(inputs, slice(1, 3))
    assert torch.equal(as_tuple(picked)[0], x[1:3])
    assert as_tuple(inputs_to(inputs, "meta"))[0].device.type == "meta"
    assert as_tuple(map_inputs(lambda t: t * 2, inputs))[0][1, 1] == 6
    assert torch.equal(run_model(lambda *xs: xs[-1], inputs), as_tuple(inputs)[-1])


# ---- 3. integer streams and Embedding ------------------------------------------------------------
ONE_STREAM = """
    model_components:
      net: {{submodels: [a]}}
    a:
      submodel_input: {{input_data: {{data_key: labels, input_size: {size}, dtype: int64}}}}
      layers: [{layers}]
    """


@pytest.mark.parametrize("size, layer, shape", [
    ([], "{Embedding: {num_embeddings: 5, embedding_dim: 3}}", (3,)),  # one index a sample
    ([7], "{Embedding: {num_embeddings: 5, embedding_dim: 3}}", (7, 3)),  # a sequence of indices
    ([4], "{EmbeddingBag: {num_embeddings: 5, embedding_dim: 3}}", (3,)),  # a bag of 4 a sample
])
def test_embeddings_read_integer_streams(tmp_path, size, layer, shape):
    model = model_base.PyNet(arch_file(tmp_path, ONE_STREAM.format(size=size, layers=layer)))
    assert model.rows[-1]["shape"] == shape  # worked out on integer meta tensors
    x = torch.randint(5, (2, *size))
    assert model(x).shape == (2, *shape)


@pytest.mark.parametrize("size, layers, key_path, words", [
    ([4], "{Linear: {out_features: 2}}", "a.layers[0]",
     "Linear reads float inputs, but labels is an int64 stream; put an Embedding first"),
    ([4], "{Flatten: null}, {Conv1d: {out_channels: 2, kernel_size: 1}}", "a.layers[1]",
     "Conv1d reads float inputs, but labels is an int64 stream"),  # through a layer that keeps integers
    ([], "{EmbeddingBag: {num_embeddings: 5, embedding_dim: 3}}", "a.layers[0]", "use Embedding"),
    ([], "{ReLU: null}", "a.layers[0]", "gets a scalar per sample"),
])
def test_integer_streams_into_layers_that_cannot_read_them_are_refused(tmp_path, size, layers, key_path, words):
    path, message = refused(tmp_path, ONE_STREAM.format(size=size, layers=layers))
    assert message.startswith(f"{path}: {key_path}: ") and words in message, message


def test_integer_and_float_inputs_are_not_concatenated(tmp_path):
    """torch.cat would make the indices floats, which no Embedding reads: embed them first."""
    path, message = refused(tmp_path, """
        model_components:
          net: {submodels: [a, b]}
        a:
          submodel_input: {input_data: {data_key: labels, input_size: [4], dtype: int64}}
          layers: [{Identity: null}]
        b:
          submodel_input: {a: output, input_data: {data_key: noise, input_size: [4]}}
          layers: [{Linear: {out_features: 2}}]
        """)
    assert message.startswith(f"{path}: b.submodel_input: reads integer (a) and float inputs"), message
    assert "Embedding" in message


def test_the_data_must_hold_integers_where_the_architecture_declares_int64(cgan):
    """check_batches_fit_model: labels read as float32 are refused, naming the stream and the fix."""
    folder = cgan[0]
    cfg_path = cgan_config(folder, labels={"file_reader_args": {"key": "labels", "dtype": "float32"}})
    model = cgan_model(cgan)
    cfg = config.load_training_config(cfg_path)
    streams = load_streams(cfg["dataset"], 0, str(cfg_path))
    data = build_dataset(streams, cfg["dataset"], torch.arange(N_SAMPLES), False, "dataset")
    with pytest.raises(UserError) as e:
        cli.check_batches_fit_model({"training": data}, model, str(cfg_path))
    message = str(e.value)
    assert message.startswith(f"{cfg_path}: dataset.labels: training samples are float32") and \
        "declares labels dtype int64" in message and "file_reader_args: {dtype: int64}" in message, message


def test_the_trial_step_names_every_input_stream(cgan):
    model = cgan_model(cgan)
    inputs = (torch.tensor([0, 1]), torch.randn(2, 16))
    assert preflight.input_streams(model) == "dataset streams 'labels' and 'noise'"
    assert preflight.input_samples(model, inputs) == ("labels: samples of shape [] (int64); noise: samples of "
                                                      "shape [16] (float32)")
    toy = model_base.PyNet(SRC / ARCH_YAML)
    assert preflight.input_streams(toy) == "dataset stream 'gen_inputs'"
    assert preflight.input_samples(toy, torch.zeros(2, 1, 4, 4)) == "samples of shape [1, 4, 4] (float32)"


# ---- 4. parametrizations -------------------------------------------------------------------------
def test_parametrized_layers_in_the_table_and_their_parameters(cgan):
    model = cgan_model(cgan)
    rows = {row["name"]: row for row in model.rows}
    assert rows["gen_fc_Linear_0"]["type"] == "Linear+spectral_norm"
    assert rows["gen_fc_Linear_2"]["type"] == "Linear+weight_norm"
    assert rows["disc_Conv2d_0"]["type"] == "Conv2d+spectral_norm"
    assert rows["disc_Linear_3"]["type"] == "Linear+spectral_norm"
    assert rows["gen_fc_Linear_0"]["params"] == 24 * 32 + 32  # the original weight and the bias
    assert rows["gen_fc_Linear_2"]["params"] == 32 * 256 + 256 + 256  # direction, magnitude (one a row), bias
    layer = model.submodels["disc"].layers["disc_Linear_3"]
    assert layer.parametrizations.weight[0].n_power_iterations == 2
    assert f"total: {sum(p.numel() for p in model.parameters()):,} parameters" in model.summary()


def test_a_spectral_normed_weight_has_spectral_norm_one(cgan):
    model = cgan_model(cgan).eval()
    weight = model.submodels["disc"].layers["disc_Conv2d_0"].weight
    sigma = torch.linalg.matrix_norm(weight.flatten(1), ord=2)
    assert abs(sigma.item() - 1) < 0.05, sigma


def test_parametrized_weights_round_trip_and_average(cgan):
    """The state_dict loads into a fresh model, which then gives the same outputs and scores; an
    AveragedModel copy (what an EMA keeps) runs and, after one update, gives them too."""
    model = cgan_model(cgan)
    labels, noise = torch.tensor([0, 2, 1]), torch.randn(3, 16)
    model(labels, noise)  # a training-mode pass: the power iteration moves its vectors
    model.eval()
    torch.manual_seed(5)
    fresh = model_base.PyNet(cgan[0] / "cgan.yaml").eval()
    assert not torch.equal(fresh(labels, noise), model(labels, noise))
    fresh.load_state_dict(model.state_dict())
    out = model(labels, noise)
    torch.testing.assert_close(fresh(labels, noise), out, rtol=0, atol=0)
    torch.testing.assert_close(fresh.discriminate(out, (labels, noise)), model.discriminate(out, (labels, noise)),
                               rtol=0, atol=0)
    averaged = AveragedModel(model)
    averaged.update_parameters(model)
    torch.testing.assert_close(averaged(labels, noise), out, rtol=0, atol=1e-6)


PARAMETRIZED = """
    model_components:
      net: {{submodels: [a]}}
    a:
      submodel_input: {{input_data: {{data_key: x, input_size: [4]}}}}
      layers:
        - {layer}
    """


@pytest.mark.parametrize("layer, key_path, words", [
    ("{Linear: {out_features: 2}, parametrization: spectral_nrom}", "a.layers[0].parametrization",
     "unknown parametrization (did you mean 'spectral_norm'?); valid: orthogonal, spectral_norm, weight_norm"),
    ("{Linear: {out_features: 2}, parametrization: {spectral_norm: {n_power_iteration: 1}}}",
     "a.layers[0].parametrization.spectral_norm.n_power_iteration", "did you mean 'n_power_iterations'"),
    ("{Linear: {out_features: 2}, parametrization: {spectral_norm: {n_power_iterations: 0}}}",
     "a.layers[0].parametrization", "spectral_norm(n_power_iterations=0) failed on Linear"),
    ("{Linear: {out_features: 2}, parametrization: [spectral_norm]}", "a.layers[0].parametrization",
     "expected a name"),
    ("{ReLU: null, parametrization: spectral_norm}", "a.layers[0].parametrization",
     "ReLU has no parameter 'weight' (it has no parameters of its own)"),
    ("{layer_type: Linear, layer_params: {out_features: 2}, parametrisation: spectral_norm}",
     "a.layers[0].parametrisation", "did you mean 'parametrization'"),
])
def test_parametrization_mistakes_are_user_errors_at_their_key(tmp_path, layer, key_path, words):
    path, message = refused(tmp_path, PARAMETRIZED.format(layer=layer))
    assert message.startswith(f"{path}: {key_path}") and words in message, message


def test_a_parametrized_layer_of_layers_py_names_its_inner_weights(tmp_path):
    path, message = refused(tmp_path, """
        model_components:
          net: {submodels: [a]}
        a:
          submodel_input: {input_data: {data_key: x, input_size: [1, 4, 4]}}
          layers: [{ResidualBlock: {out_channels: 2}, parametrization: weight_norm}]
        """)
    assert f"{path}: a.layers[0].parametrization: " in message and "conv1.weight" not in message
    assert "ResidualBlock has no parameter 'weight'" in message, message


# ---- 5. the scripts: evaluate.py and jit_trace_model.py ------------------------------------------
@pytest.mark.filterwarnings("ignore::FutureWarning")  # TorchScript's deprecation notice
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_export_of_several_streams_from_the_data(cgan, capsys):
    """-i 3 (the batch alone): one artifact named by every stream, a raw file a stream, the labels'
    the data's first labels as int64, and the artifact run on the raw files gives eager's output."""
    folder, cfg_path, path = cgan
    jit_trace_model.main(["-t", str(cfg_path), "-c", str(path), "-i", "3"])
    jit = path.parent / "jit"
    artifact = jit / f"{path.stem}_labels-3_noise-3x16_traced.pt"
    sidecar = json.loads((jit / f"{artifact.name}.json").read_text())
    assert [i["name"] for i in sidecar["inputs"]] == ["labels", "noise"]
    assert sidecar["input"] == "labels" and sidecar["dtype"] == "int64" and sidecar["shape"] == [3]
    raw_labels, raw_noise = (jit / i["example_input"] for i in sidecar["inputs"])
    assert raw_labels.name == f"{path.stem}_input_labels-3.raw"
    assert raw_noise.name == f"{path.stem}_input_noise-3x16.raw"
    labels = torch.from_numpy(np.fromfile(raw_labels, dtype=np.int64))
    noise = torch.from_numpy(np.fromfile(raw_noise, dtype=np.float32).reshape(3, 16))
    assert torch.equal(labels, first_samples()[:3])
    assert sidecar["inputs"][1]["example_input_from"] == "the first samples of dataset.noise"
    eager = cgan_model(cgan)
    eager.load_state_dict(torch.load(path)["model_state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(artifact))(labels, noise), eager.eval()(labels, noise),
                                   rtol=0, atol=1e-6)
    assert "int64, C order, shape 3" in capsys.readouterr().out


def loaded_program(path, fmt):
    """The artifact at `path` as a device would load it: a function of the inputs, in order."""
    if fmt == "export":
        return torch.export.load(str(path)).module()
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [given.name for given in session.get_inputs()] == ["labels", "noise"]  # named after the streams
    return lambda labels, noise: torch.from_numpy(session.run(None, {"labels": labels.numpy(),
                                                                     "noise": noise.numpy()})[0])


@pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")  # torch.onnx: one batch, as asked
@pytest.mark.parametrize("fmt", ["export", pytest.param("onnx", marks=[pytest.mark.slow, pytest.mark.skipif(
    not ONNX_READY, reason="needs onnx, onnxscript and onnxruntime")])])
def test_a_dynamic_batch_is_shared_by_every_stream(cgan, fmt):
    """--dynamic-batch: one open batch for labels and noise; the file, loaded back, takes batch 5."""
    folder, cfg_path, path = cgan
    jit_trace_model.main(["-t", str(cfg_path), "-c", str(path), "-i", "1", "--format", fmt, "--dynamic-batch"])
    name = f"{path.stem}_labels-N_noise-Nx16{jit_trace_model.FORMATS[fmt]}"
    sidecar = json.loads((path.parent / "jit" / f"{name}.json").read_text())
    assert [i["shape"] for i in sidecar["inputs"]] == [[None], [None, 16]] and sidecar["batch_sizes_checked"] == [1, 7]
    program = loaded_program(path.parent / "jit" / name, fmt)
    labels, noise = first_samples()[:5], torch.randn(5, 16)
    eager = cgan_model(cgan)
    eager.load_state_dict(torch.load(path)["model_state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(program(labels, noise), eager.eval()(labels, noise), rtol=0, atol=1e-5)


def test_a_wrong_input_size_names_every_stream(cgan):
    folder, cfg_path, path = cgan
    with pytest.raises(UserError) as e:
        jit_trace_model.main(["-t", str(cfg_path), "-c", str(path), "-i", "3", "16"])
    message = str(e.value)
    assert "use -i 3, or the batch size alone (-i 3)" in message and "other inputs (noise [16])" in message, message


def test_integer_examples_never_come_from_chance(cgan):
    """Labels the data gives as float: no example for an Embedding (nothing is written); noise of
    another shape in the data: drawn from N(0, 1), with a note."""
    folder, cfg_path, path = cgan
    jit = path.parent / "jit"
    before = sorted(jit.iterdir()) if jit.exists() else []
    bad = cgan_config(folder, labels={"file_reader_args": {"key": "labels", "dtype": "float32"}})
    with pytest.raises(UserError) as e:
        jit_trace_model.main(["-t", str(bad), "-c", str(path), "-i", "2"])
    assert str(e.value).startswith(f"{bad}: dataset.labels: the example inputs of labels") and \
        "its samples are float32, not int64" in str(e.value), str(e.value)
    assert (sorted(jit.iterdir()) if jit.exists() else []) == before
    other = cgan_config(folder, noise={"data_generating_function_args": {"shape": [8]}})
    examples = jit_trace_model.ExampleInputs(config.load_training_config(other), str(other), cgan_model(cgan))
    assert examples.origins["noise"].startswith("N(0, 1): its samples have shape [8]")
    labels, noise = examples.first(4)
    assert torch.equal(labels, first_samples()[:4]) and noise.shape == (4, 16)


def test_evaluate_runs_a_model_of_several_streams(cgan, capsys):
    """Generated samples beside real ones, and the conditional discriminator's scores."""
    folder, cfg_path, path = cgan
    evaluate.main(["-t", str(cfg_path), "-e", str(SRC / "configs/example_model/example_evaluation_cfg.yaml"),
                   "--set", f"evaluation.model_checkpoint_filename={path}", "--set", "evaluation.n_samples=16"])
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert metrics["n_samples"] == 16 and "discriminator_score_real" in metrics
    assert "target_to_nearest_output" in metrics
    assert (path.parent / f"{path.stem}_all_{metrics['settings_hash']}_samples.png").is_file()


def test_the_pictures_show_a_float_input_of_several_or_none():
    image, labels = torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])
    assert evaluate.shown_input(image) is image
    assert evaluate.shown_input((labels, image)) is image
    assert evaluate.shown_input((labels, torch.zeros(2))) is None  # one value a sample is no picture


# ---- 6. a spectral-normed discriminator trains and exports -----------------------------------------
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_spectral_normed_gan_trains_and_exports(tmp_path):
    """The toy GAN with spectral_norm on its discriminator's layers and one generator layer: a
    step changes their weights, and the checkpoint exports (TorchScript) as eager runs it."""
    arch = (SRC / ARCH_YAML).read_text()
    arch = arch.replace("- {Conv2d: {out_channels: 16, kernel_size: 3, padding: 1}}",
                        "- {Conv2d: {out_channels: 16, kernel_size: 3, padding: 1}, parametrization: spectral_norm}")
    arch = arch.replace("- {Linear: {out_features: 1}}",
                        "- {Linear: {out_features: 1}, parametrization: spectral_norm}")
    arch = arch.replace("- {Linear: {out_features: 64}}  ",
                        "- {Linear: {out_features: 64}, parametrization: {spectral_norm: {n_power_iterations: 1}}}  ")
    assert arch.count("spectral_norm") == 3
    (tmp_path / "arch.yaml").write_text(arch)
    save = tmp_path / "runs"
    sets = ["--set", f"model.architecture_cfg_path={tmp_path / 'arch.yaml'}",
            "--set", f"saving.save_folder_name={save}", "--set", "logging.tensorboard=false"]
    train.main(["-t", str(SRC / TRAIN_CFG), "--set", "training.n_epochs=1", "--set", "dataset.real_images.n_inputs=64",
                *sets])
    first, last = (torch.load(p)["model_state_dict"] for p in checkpoints(newest_run(save)))
    for layer in ("disc_cnn_Conv2d_0", "disc_cnn_Linear_5", "gen_dec_Linear_0"):
        key = f"{layer}.parametrizations.weight.original"
        full = next(k for k in first if k.endswith(key))
        assert not torch.equal(first[full], last[full]), key
    jit_trace_model.main(["-t", str(SRC / TRAIN_CFG), *sets, "-c", "latest", "-i", "2", "1", "4", "4"])
    ckpt = checkpoints(newest_run(save))[-1]
    assert (ckpt.parent / "jit" / f"{ckpt.stem}_2x1x4x4_traced.pt").is_file()
