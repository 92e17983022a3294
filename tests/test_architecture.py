"""The architecture compiler beyond the toy model: every input-size rule, the refusals, the
one-tensor layers of layers.py, the U-Net example against hand-written modules, compile / trace /
export, passes from several threads, the summary, and the U-Net example's data."""
import copy
import inspect
import re
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

import dataset_functions
import layers as custom_layers
from conftest import SRC, TRAIN_CFG, run
from engine import architecture, config, model_base
from engine.errors import UserError
from test_model import HandWrittenGenerator

UNET_CFG = "configs/unet_gan/unet_gan_training_cfg.yaml"
UNET_ARCH = "models/unet_gan/unet_gan_architecture.yaml"


# ---- helpers -----------------------------------------------------------------------------------
def one_layer_arch(tmp_path, layer_type, params, input_size, name="arch.yaml"):
    """An architecture of one submodel `a` holding one layer, reading `input_size` per sample."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""
        model_components:
          net: {{adv_type: generator, submodels: [a]}}
        a:
          submodel_input: {{input_data: {{data_key: x, input_size: {list(input_size)}}}}}
          layer_name_prefix: a
          layers:
            - {{layer_type: {layer_type}, layer_params: {params if params is not None else 'null'}}}
        """))
    return path


def build_one_layer(tmp_path, layer_type, params, input_size, seed=0):
    """(model, its only layer) of a one-layer architecture."""
    torch.manual_seed(seed)
    model = model_base.PyNet(one_layer_arch(tmp_path, layer_type, params, input_size))
    (layer,) = model.submodels["a"].layers.values()
    return model, layer


def build_from_config(cfg_path, seed=0):
    """The model of a training config, as train.py builds it."""
    torch.manual_seed(seed)
    return model_base.build_model(config.load_training_config(SRC / cfg_path)["model"])


def refusal(tmp_path, layer_type, params=None, input_size=(3, 4, 4)):
    """The message of the UserError that building a one-layer architecture raises."""
    path = one_layer_arch(tmp_path, layer_type, params, input_size)
    with pytest.raises(UserError) as e:
        model_base.PyNet(path)
    return str(path), str(e.value)


def copy_weights_in_order(built, hand):
    """Load `built`'s state_dict into `hand`, entry by entry in order; shapes and kinds must match."""
    built_sd, hand_sd = built.state_dict(), hand.state_dict()
    assert len(built_sd) == len(hand_sd), (list(built_sd), list(hand_sd))
    for (bk, bv), (hk, hv) in zip(built_sd.items(), hand_sd.items()):
        assert bv.shape == hv.shape and bk.rsplit(".", 1)[1] == hk.rsplit(".", 1)[1], (bk, hk)
    hand.load_state_dict({hk: bv.clone() for hk, bv in zip(hand_sd, built_sd.values())})


def randomize_norms(module, seed=0):
    """Random affine weights and running statistics for every norm layer, so that train and eval
    mode differ and a swapped or skipped norm shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


def assert_same_passes(built, hand, built_fn, hand_fn, inputs):
    """Outputs, every parameter's gradient and the buffers afterwards are bitwise equal, in train
    and in eval mode."""
    built_params, hand_params = list(built.parameters()), list(hand.parameters())
    assert [p.shape for p in built_params] == [p.shape for p in hand_params]
    for mode in ("train", "eval"):
        for module in (built, hand):
            getattr(module, mode)()
            module.zero_grad(set_to_none=True)
        out_built, out_hand = built_fn(*inputs), hand_fn(*inputs)
        assert torch.equal(out_built, out_hand), mode
        weights = torch.randn(out_built.shape, generator=torch.Generator().manual_seed(1))
        (out_built * weights).sum().backward()
        (out_hand * weights).sum().backward()
        for i, (pb, ph) in enumerate(zip(built_params, hand_params)):
            assert pb.grad is not None and torch.equal(pb.grad, ph.grad), (mode, i)
        for (name, vb), vh in zip(built.state_dict().items(), hand.state_dict().values()):
            assert torch.equal(vb, vh), (mode, name)  # e.g. BatchNorm's running stats after a train pass


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---- 1. the input-size table -------------------------------------------------------------------
# layer type -> (per-sample input shape, the other params, {inferred argument: the input dim it is
# read from}). Channels are dim 0 of the per-sample shape, features the last dim; the shapes are
# chosen so that the two differ wherever the layer allows it.
INPUT_SIZE_CASES = {
    "Conv1d": ([3, 8], {"out_channels": 4, "kernel_size": 3}, {"in_channels": 0}),
    "Conv2d": ([3, 6, 5], {"out_channels": 4, "kernel_size": 3}, {"in_channels": 0}),
    "Conv3d": ([3, 4, 4, 5], {"out_channels": 2, "kernel_size": 3}, {"in_channels": 0}),
    "ConvTranspose1d": ([3, 8], {"out_channels": 4, "kernel_size": 3}, {"in_channels": 0}),
    "ConvTranspose2d": ([3, 6, 5], {"out_channels": 4, "kernel_size": 2, "stride": 2}, {"in_channels": 0}),
    "ConvTranspose3d": ([3, 4, 4, 5], {"out_channels": 2, "kernel_size": 2}, {"in_channels": 0}),
    "BatchNorm1d": ([3, 8], {}, {"num_features": 0}),
    "BatchNorm2d": ([3, 4, 5], {}, {"num_features": 0}),
    "BatchNorm3d": ([3, 2, 4, 5], {}, {"num_features": 0}),
    "InstanceNorm1d": ([3, 8], {"affine": True}, {"num_features": 0}),
    "InstanceNorm2d": ([3, 4, 5], {"affine": True}, {"num_features": 0}),
    "InstanceNorm3d": ([3, 2, 4, 5], {"affine": True}, {"num_features": 0}),
    "SyncBatchNorm": ([3, 4, 5], {}, {"num_features": 0}),
    "GroupNorm": ([4, 3, 5], {"num_groups": 2}, {"num_channels": 0}),
    "LayerNorm": ([5, 6], {}, {"normalized_shape": -1}),
    "RMSNorm": ([5, 6], {}, {"normalized_shape": -1}),
    "Linear": ([5, 6], {"out_features": 3}, {"in_features": -1}),
    "Bilinear": ([5, 6], {"out_features": 3}, {"in1_features": -1, "in2_features": -1}),
    "RNN": ([5, 6], {"hidden_size": 4}, {"input_size": -1}),
    "GRU": ([5, 6], {"hidden_size": 4}, {"input_size": -1}),
    "LSTM": ([5, 6], {"hidden_size": 4}, {"input_size": -1}),
    "RNNCell": ([6], {"hidden_size": 4}, {"input_size": -1}),
    "GRUCell": ([6], {"hidden_size": 4}, {"input_size": -1}),
    "LSTMCell": ([6], {"hidden_size": 4}, {"input_size": -1}),
    "MultiheadAttention": ([5, 6], {"num_heads": 2}, {"embed_dim": -1}),
    "TransformerEncoderLayer": ([5, 6], {"nhead": 2, "dim_feedforward": 8}, {"d_model": -1}),
}
# Where a built layer keeps an inferred argument, when not under the argument's own name.
STORED_AS = {"d_model": lambda layer: layer.self_attn.embed_dim}


@pytest.mark.parametrize("layer_type", list(model_base.INPUT_SIZE))
def test_input_size_rule_fills_the_right_argument_and_the_layer_runs(tmp_path, layer_type):
    """Every layer type of the input-size table gets its input size from the previous output:
    the right dimension lands in the right constructor argument, and the layer then runs on a
    real batch, giving the shape the summary shows."""
    assert layer_type in INPUT_SIZE_CASES, f"add a case for {layer_type} to INPUT_SIZE_CASES"
    input_size, params, dims = INPUT_SIZE_CASES[layer_type]
    assert set(dims) == set(model_base.INPUT_SIZE[layer_type]), "every inferred argument is checked"
    model, layer = build_one_layer(tmp_path, layer_type, params, input_size)
    for arg, dim in dims.items():
        stored = STORED_AS[arg](layer) if arg in STORED_AS else getattr(layer, arg)
        expected = input_size[dim]
        assert stored in (expected, (expected,)), (arg, stored, expected)
    with torch.no_grad():
        y = model(torch.randn(2, *input_size))
    assert tuple(y.shape) == (2, *model.rows[-1]["shape"])


def test_input_size_cases_are_all_table_entries():
    """No stale cases: a layer type removed from the table is removed here too."""
    assert set(INPUT_SIZE_CASES) <= set(model_base.INPUT_SIZE)


# ---- 2. the table is complete ------------------------------------------------------------------
INPUT_SIZE_ARGS = {"in_channels", "in_features", "num_features", "num_channels", "normalized_shape", "input_size",
                   "embed_dim", "d_model", "in1_features", "in2_features"}
BASE_CLASSES = ("RNNBase", "RNNCellBase")  # not layers; see the refusal test below


def test_every_torch_layer_that_takes_an_input_size_is_handled():
    """A torch.nn class whose constructor requires an input size either has a rule in the table
    or is refused (Lazy, container, loss, not a layer): none falls through to 'needs in_channels'."""
    unhandled = []
    for name, cls in vars(nn).items():
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            continue
        parameters = inspect.signature(cls.__init__).parameters
        if not any(n in INPUT_SIZE_ARGS and p.default is p.empty for n, p in parameters.items()):
            continue
        if name in model_base.INPUT_SIZE or name in architecture.NOT_A_LAYER or name.startswith("Lazy") \
                or issubclass(cls, nn.modules.loss._Loss) or name in ("LinearCrossEntropyLoss", *BASE_CLASSES):
            continue
        unhandled.append(name)
    assert not unhandled
    assert {"RNN", "GRU", "LSTM"} <= set(model_base.INPUT_SIZE)  # torch's signatures are (*args, **kwargs)


@pytest.mark.parametrize("layer_type, params, alternative", [
    ("RNNBase", {"mode": "LSTM", "hidden_size": 4}, "LSTM"),
    ("RNNCellBase", {"hidden_size": 4, "bias": True, "num_chunks": 4}, "LSTMCell"),
])
def test_recurrent_base_classes_are_refused_with_the_classes_to_use(tmp_path, layer_type, params, alternative):
    """torch.nn's recurrent base classes are not layers: naming one is refused at its layer_type,
    pointing at the concrete classes, not with a request for an input size."""
    path, message = refusal(tmp_path, layer_type, params, input_size=(5, 6))
    assert path in message and "a.layers[0].layer_type" in message and alternative in message, message


# ---- 3. refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_type, params, alternative", [
    ("LazyConv2d", {"out_channels": 2, "kernel_size": 1}, "use Conv2d"),
    ("Sequential", None, "list its layers in the submodel"),
    ("Transformer", None, "TransformerEncoderLayer"),
    ("MSELoss", None, "loss.py"),
    pytest.param("LinearCrossEntropyLoss", {"num_classes": 3}, "loss.py",
                 marks=pytest.mark.skipif(not hasattr(nn, "LinearCrossEntropyLoss"), reason="torch without it")),
])
def test_classes_that_are_not_layers_are_refused(tmp_path, layer_type, params, alternative):
    """Lazy layers, containers, Transformer and losses are refused at their layer_type, with the
    file, the key path and what to use instead."""
    path, message = refusal(tmp_path, layer_type, params)
    assert path in message and "a.layers[0].layer_type" in message and alternative in message, message


# ---- 4. the one-tensor versions in layers.py ---------------------------------------------------
def first(out):
    return out[0]


# layer type -> (per-sample input, YAML params, the torch.nn layer with the same arguments, its call)
ONE_TENSOR = {
    "RNN": ([5, 6], {"hidden_size": 4, "nonlinearity": "relu"},
            lambda: nn.RNN(6, 4, nonlinearity="relu", batch_first=True), lambda m, x: first(m(x))),
    "GRU": ([5, 6], {"hidden_size": 4, "num_layers": 2},
            lambda: nn.GRU(6, 4, num_layers=2, batch_first=True), lambda m, x: first(m(x))),
    "LSTM": ([5, 6], {"hidden_size": 4, "bidirectional": True, "proj_size": 2},
             lambda: nn.LSTM(6, 4, bidirectional=True, proj_size=2, batch_first=True), lambda m, x: first(m(x))),
    "LSTMCell": ([6], {"hidden_size": 4}, lambda: nn.LSTMCell(6, 4), lambda m, x: first(m(x))),
    "MultiheadAttention": ([5, 6], {"num_heads": 2}, lambda: nn.MultiheadAttention(6, 2, batch_first=True),
                           lambda m, x: first(m(x, x, x, need_weights=False))),
    "Bilinear": ([5, 6], {"out_features": 3}, lambda: nn.Bilinear(6, 6, 3), lambda m, x: m(x, x)),
    "TransformerEncoderLayer": ([5, 6], {"nhead": 2, "dim_feedforward": 8},
                                lambda: nn.TransformerEncoderLayer(6, 2, 8, batch_first=True), lambda m, x: m(x)),
}


@pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")  # oneDNN falls back, same result
@pytest.mark.parametrize("layer_type", list(ONE_TENSOR))
def test_one_tensor_layer_is_torch_nn_layer_with_same_weights(tmp_path, layer_type):
    """The layers.py version that an architecture gets by the torch.nn name has torch.nn's
    state_dict (checkpoints and pretrained weights load either way) and computes what torch.nn
    computes on a batch-first input."""
    input_size, params, make_reference, call_reference = ONE_TENSOR[layer_type]
    model, layer = build_one_layer(tmp_path, layer_type, params, input_size)
    assert type(layer) is getattr(custom_layers, layer_type)
    torch.manual_seed(1)
    reference = make_reference()
    assert list(layer.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(layer.state_dict())
    model.eval()
    reference.eval()
    x = torch.randn(3, *input_size)
    with torch.no_grad():
        assert torch.equal(model(x), call_reference(reference, x))


@pytest.mark.parametrize("layer_type", [t for t in ONE_TENSOR if "batch_first" in
                                        inspect.signature(getattr(custom_layers, t).__init__).parameters])
def test_batch_first_false_is_a_user_error(tmp_path, layer_type):
    """batch_first: false (torch.nn's sequence-first layout) is refused, naming the key and why."""
    input_size, params, _, _ = ONE_TENSOR[layer_type]
    path, message = refusal(tmp_path, layer_type, {**params, "batch_first": False}, input_size)
    assert path in message and "a.layers[0].layer_params" in message and "batch_first" in message, message


# ---- 5. the examples against hand-written modules ----------------------------------------------
class HandUNetGenerator(nn.Module):
    """unet_enc + unet_dec of unet_gan_architecture.yaml, spelled out."""

    def __init__(self):
        super().__init__()
        self.enc_conv0 = nn.Conv2d(1, 16, 3, padding=1)
        self.enc_conv2 = nn.Conv2d(16, 32, 4, stride=2, padding=1)
        self.enc_bn3 = nn.BatchNorm2d(32)
        self.enc_conv5 = nn.Conv2d(32, 64, 4, stride=2, padding=1)
        self.enc_bn6 = nn.BatchNorm2d(64)
        self.enc_conv8 = nn.Conv2d(64, 64, 4, stride=2, padding=1)
        self.dec_up0 = nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1)
        self.dec_bn1 = nn.BatchNorm2d(64)
        self.dec_up3 = nn.ConvTranspose2d(64 + 64, 32, 4, stride=2, padding=1)
        self.dec_bn4 = nn.BatchNorm2d(32)
        self.dec_up6 = nn.ConvTranspose2d(32 + 32, 16, 4, stride=2, padding=1)
        self.dec_bn7 = nn.BatchNorm2d(16)
        self.dec_conv9 = nn.Conv2d(16 + 16, 1, 3, padding=1)
        self.lrelu, self.relu = nn.LeakyReLU(0.2), nn.ReLU()

    def forward(self, noisy):
        e1 = self.lrelu(self.enc_conv0(noisy))                         # [16, 32, 32]
        e4 = self.lrelu(self.enc_bn3(self.enc_conv2(e1)))               # [32, 16, 16]
        e7 = self.lrelu(self.enc_bn6(self.enc_conv5(e4)))               # [64, 8, 8]
        code = self.relu(self.enc_conv8(e7))                            # [64, 4, 4]
        d = torch.cat((self.relu(self.dec_bn1(self.dec_up0(code))), e7), 1)
        d = torch.cat((self.relu(self.dec_bn4(self.dec_up3(d))), e4), 1)
        d = torch.cat((self.relu(self.dec_bn7(self.dec_up6(d))), e1), 1)
        return torch.tanh(self.dec_conv9(d) + noisy)


class HandPatchDiscriminator(nn.Module):
    """patch_disc of unet_gan_architecture.yaml: scores a (noisy, image) pair per 4x4 patch."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(2, 32, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 4, stride=2, padding=1)
        self.norm3 = nn.InstanceNorm2d(64, affine=True)
        self.conv5 = nn.Conv2d(64, 1, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2)

    def forward(self, images, noisy):
        x = torch.cat((noisy, images), 1)
        return self.conv5(self.lrelu(self.norm3(self.conv2(self.lrelu(self.conv0(x))))))


class HandToyDiscriminator(nn.Module):
    """disc_cnn of example_model_architecture.yaml."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.linear5 = nn.Linear(32 * 2 * 2, 1)

    def forward(self, images):
        x = nn.functional.leaky_relu(self.conv0(images), 0.2)
        x = nn.functional.leaky_relu(self.conv2(x), 0.2)
        return self.linear5(x.flatten(1))


def test_unet_generator_equals_hand_written():
    """The built U-Net (cat skips from encoder to decoder, the input added before Tanh) computes
    exactly the hand-written one: outputs, gradients and BatchNorm statistics, train and eval."""
    model = build_from_config(UNET_CFG)
    generator = model.model_components["generator"]
    randomize_norms(generator)
    hand = HandUNetGenerator()
    copy_weights_in_order(generator, hand)
    assert_same_passes(generator, hand, model, hand, (randn(4, 1, 32, 32, seed=2),))


def test_unet_discriminator_equals_hand_written():
    """The conditional discriminator scores cat(noisy, image) exactly as written by hand."""
    model = build_from_config(UNET_CFG)
    discriminator = model.model_components["discriminator"]
    randomize_norms(discriminator)
    hand = HandPatchDiscriminator()
    copy_weights_in_order(discriminator, hand)
    inputs = (randn(4, 1, 32, 32, seed=2), randn(4, 1, 32, 32, seed=3))
    assert_same_passes(discriminator, hand, model.discriminate, hand, inputs)


def test_toy_generator_and_discriminator_gradients_equal_hand_written():
    """The toy GAN's generator and discriminator: outputs and gradients as written by hand."""
    model = build_from_config(TRAIN_CFG)
    for component, hand, fn in (("generator", HandWrittenGenerator(), model),
                                ("discriminator", HandToyDiscriminator(), model.discriminate)):
        built = model.model_components[component]
        copy_weights_in_order(built, hand)
        assert_same_passes(built, hand, fn, hand, (randn(4, 1, 4, 4, seed=2),))


# ---- 6. compile, trace, export -----------------------------------------------------------------
def example_inputs(name, seed):
    """(model, forward's inputs, discriminate's inputs) for the toy GAN or the U-Net, batch 4."""
    if name == "toy":
        return build_from_config(TRAIN_CFG), (randn(4, 1, 4, 4, seed=seed),), (randn(4, 1, 4, 4, seed=seed + 1),)
    noisy = randn(4, 1, 32, 32, seed=seed)
    return build_from_config(UNET_CFG), (noisy,), (randn(4, 1, 32, 32, seed=seed + 1), noisy)


def close(a, b, atol=1e-6):
    return a.shape == b.shape and torch.allclose(a, b, atol=atol)


@pytest.mark.parametrize("name", ["toy", "unet"])
def test_compile_fullgraph_matches_eager(name):
    """torch.compile with fullgraph=True (a graph break is an error) of forward and of
    discriminate gives the eager results."""
    model, fwd, disc = example_inputs(name, seed=0)
    model.eval()
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert close(compiled(*fwd), model(*fwd))
        compiled_disc = torch.compile(model.discriminate, fullgraph=True, backend="aot_eager")
        assert close(compiled_disc(*disc), model.discriminate(*disc))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TorchScript's deprecation notice
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # torch.nn's own shape checks, constant here
@pytest.mark.parametrize("name", ["toy", "unet"])
def test_jit_trace_matches_eager_on_new_inputs(name):
    """TorchScript traces of forward and discriminate (what jit_trace_model.py saves) give the
    eager results on inputs other than the ones traced with."""
    model, fwd, disc = example_inputs(name, seed=0)
    _, new_fwd, new_disc = example_inputs(name, seed=10)
    model.eval()
    with torch.no_grad():
        traced = torch.jit.trace_module(model, {"forward": fwd, "discriminate": disc}, check_trace=False)
        assert close(traced(*new_fwd), model(*new_fwd))
        assert close(traced.discriminate(*new_disc), model.discriminate(*new_disc))


@pytest.mark.parametrize("name", ["toy", "unet"])
def test_export_matches_eager_on_new_inputs(name):
    """torch.export of the inference path gives the eager results."""
    model, fwd, _ = example_inputs(name, seed=0)
    _, new_fwd, _ = example_inputs(name, seed=10)
    model.eval()
    exported = torch.export.export(model, fwd).module()
    with torch.no_grad():
        assert close(exported(*new_fwd), model(*new_fwd))


@pytest.mark.slow
def test_unet_inductor_training_step_matches_eager():
    """The default torch.compile backend (inductor) trains the U-Net as eager does: outputs,
    gradients and BatchNorm running statistics."""
    eager, (noisy,), _ = example_inputs("unet", seed=0)
    compiled_model = copy.deepcopy(eager)
    eager.train()
    compiled_model.train()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True)
    out_eager, out_compiled = eager(noisy), compiled(noisy)
    assert torch.allclose(out_compiled, out_eager, atol=1e-5)
    weights = randn(*out_eager.shape, seed=5)
    (out_eager * weights).sum().backward()
    (out_compiled * weights).sum().backward()
    # A bias right before a train-mode BatchNorm has no effect (the norm subtracts the batch mean):
    # its exact gradient is 0, and both backends give rounding noise, which is compared with 0.
    no_effect = {f"{row['name']}.bias" for row, after in zip(eager.rows, eager.rows[1:])
                 if after["type"].startswith("BatchNorm") and not row["merges"]}
    grads = 0
    for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters()):
        assert (pe.grad is None) == (pc.grad is None), name
        if pe.grad is None:
            continue
        grads += 1
        if ".".join(name.split(".")[-2:]) in no_effect:
            assert pe.grad.abs().max() < 1e-4 and pc.grad.abs().max() < 1e-4, name
        else:  # float32 sums in another order: errors scale with the gradient's magnitude
            scale = max(1.0, pe.grad.abs().max().item())
            assert torch.allclose(pc.grad, pe.grad, rtol=1e-4, atol=1e-5 * scale), name
    assert grads == len(eager.parameters_of("generator"))
    for (name, be), bc in zip(eager.named_buffers(), compiled_model.buffers()):
        assert torch.allclose(bc.float(), be.float(), rtol=1e-4, atol=1e-5), name


# ---- 7. nothing shared between passes ----------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    return build_from_config(TRAIN_CFG).eval()


@pytest.fixture(scope="module")
def unet():
    return build_from_config(UNET_CFG).eval()


def passes(toy, unet, inputs):
    """Each model's forward and discriminate on each input pair (inference mode)."""
    with torch.no_grad():
        return [(toy(a), toy.discriminate(toy(a)), unet(b), unet.discriminate(unet(b), b)) for a, b in inputs]


def test_concurrent_passes_give_the_sequential_results(toy, unet):
    """Two threads running both models at once on different inputs get what each pass gets
    alone: a pass keeps its skip outputs to itself."""
    inputs = {t: [(randn(2, 1, 4, 4, seed=100 * t + i), randn(2, 1, 32, 32, seed=100 * t + 50 + i))
                  for i in range(20)] for t in range(2)}
    expected = {t: passes(toy, unet, inputs[t]) for t in range(2)}
    start = threading.Barrier(2)

    def worker(t):
        start.wait()
        return passes(toy, unet, inputs[t])

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(range(2), pool.map(worker, range(2))))
    for t in range(2):
        for i, (got, want) in enumerate(zip(results[t], expected[t])):
            assert all(torch.equal(g, w) for g, w in zip(got, want)), (t, i)


def test_deepcopy_gives_the_same_outputs(toy, unet):
    """A deep copy of a model (as for an EMA or a frozen reference) computes what the model does."""
    inputs = [(randn(2, 1, 4, 4, seed=7), randn(2, 1, 32, 32, seed=8))]
    got = passes(copy.deepcopy(toy), copy.deepcopy(unet), inputs)[0]
    want = passes(toy, unet, inputs)[0]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---- 8. the summary ----------------------------------------------------------------------------
def summary_rows(text):
    """layer name -> [type, output shape, params, merged in / reads] of a summary's table."""
    rows = {}
    for line in text.splitlines()[2:]:  # after the header and the rule
        if line.endswith(" parameters"):
            break
        name, *cells = re.split(r" {2,}", line.strip())
        rows[name] = cells + [""] * (4 - len(cells))
    return rows


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_unet_summary_rows_and_totals(unet):
    """The summary shows the U-Net's merges, the discriminator's two inputs, and totals that are
    the real parameter counts."""
    text = unet.summary()
    rows = summary_rows(text)
    assert rows["dec_ReLU_2"] == ["ReLU", "[128, 8, 8]", "0", "cat enc_LeakyReLU_7"]
    assert rows["dec_Conv2d_9"][0] == "Conv2d" and rows["dec_Conv2d_9"][3] == "add enc_input"
    assert rows["disc_input"] == ["input", "[2, 32, 32]", "0", "noisy_images, unet_dec"]
    for component, adv_type in (("generator", "generator"), ("discriminator", "discriminator")):
        n = n_params(unet.model_components[component])
        assert f"{component} ({adv_type}): {n:,} parameters" in text.splitlines()
    assert f"total: {n_params(unet):,} parameters" in text.splitlines()
    assert sum(r["params"] for r in unet.rows) == n_params(unet)


@pytest.mark.slow
def test_model_base_cli_prints_the_summary(repo, unet):
    """`python model_base.py ARCH` prints the same summary as model.summary(), totals included."""
    proc = run(repo, "-m", "engine.model_base", UNET_ARCH)
    assert proc.stdout.strip() == unet.summary()
    assert f"total: {n_params(unet):,} parameters" in proc.stdout


@pytest.mark.slow
def test_model_base_cli_on_a_broken_architecture(repo, tmp_path):
    """A typo in a layer type: exit 2, no traceback, the file, the key path and a did-you-mean."""
    text = (SRC / UNET_ARCH).read_text()
    assert text.count("{Tanh: null}") == 1
    path = tmp_path / "broken_unet.yaml"
    path.write_text(text.replace("{Tanh: null}", "{TanH: null}"))
    proc = run(repo, "-m", "engine.model_base", path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for part in (str(path), "unet_dec.layers[10].layer_type", "did you mean 'Tanh'"):
        assert part in proc.stderr, proc.stderr


# ---- 9. the U-Net example's data ---------------------------------------------------------------
def test_shipped_shapes_data_is_what_the_generator_makes():
    """data/unet_gan/shapes_32x32.npy is shapes(1024, seed 0) in float16, as its docstring says."""
    shipped = torch.from_numpy(np.load(SRC / "data/unet_gan/shapes_32x32.npy"))
    made = dataset_functions.shapes(1024, torch.Generator().manual_seed(0)).to(torch.float16)
    assert shipped.dtype == torch.float16
    assert torch.equal(shipped, made)


def test_fixed_noise_depends_only_on_the_seed():
    """add_fixed_noise gives the same noisy copy for a seed (every epoch, training and evaluation)
    and another for another seed, leaving the clean data as it was."""
    clean = dataset_functions.shapes(8, torch.Generator().manual_seed(0))
    kept = clean.clone()
    a = dataset_functions.add_fixed_noise(clean, std=0.5, seed=1)
    b = dataset_functions.add_fixed_noise(clean, std=0.5, seed=1)
    c = dataset_functions.add_fixed_noise(clean, std=0.5, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, clean)
    assert torch.equal(clean, kept)


# ---- 10. mistakes that torch would accept, or that used to crash ---------------------------------
TWO_SUBMODELS = """
    model_components:
      gen: {{submodels: [a, b]}}
      disc: {{adv_type: discriminator, submodels: [c]}}
    a:
      submodel_input: {{input_data: {{data_key: x, input_size: [4]}}}}
      layers: [{{Linear: {{out_features: 4}}}}]
    b:
      submodel_input: {b_input}
      layers: [{{Linear: {{out_features: {b_out}}}}}]
      {b_extra}
    c:
      submodel_input: {c_input}
      layers: [{{Linear: {{out_features: 1}}}}]
    """
FIXED_MISTAKES = {  # name: (fields of TWO_SUBMODELS, key path, words the message must hold)
    "skip spec with a misspelt key": (
        dict(b_extra="skip_connections: {b_input: {future_layers: [b_Linear_0], connection_type: [cat]}}"),
        "b.skip_connections.b_input.connection_type", "did you mean 'connection_types'"),
    "submodel_input not a mapping": (dict(b_input="a"), "b.submodel_input", "expected"),
    "submodel_input value not a name": (dict(b_input="{a: [output]}"), "b.submodel_input.a", "expected 'output'"),
    "future layer not a name": (
        dict(b_extra="skip_connections: {b_input: {future_layers: [[b_Linear_0]]}}"),
        "b.skip_connections.b_input.future_layers[0]", "expected a layer name"),
    "discriminator reads a generator submodel before the last": (
        dict(c_input="{a: output}"), "c.submodel_input.a", "final output, 'b'"),
    "one stream read with two shapes": (
        dict(b_input="{a: output, input_data: {data_key: x, input_size: [5]}}"), "b.submodel_input.input_data",
        "reads x as [5] float32, but a.submodel_input.input_data reads it as [4] float32"),
    "one stream read with two dtypes": (
        dict(b_input="{a: output, input_data: {data_key: x, input_size: [4], dtype: int64}}"),
        "b.submodel_input.input_data", "reads x as [4] int64, but a.submodel_input.input_data reads it as [4] float32"),
    "a stream dtype that is not one": (
        dict(b_input="{a: output, input_data: {data_key: y, input_size: [4], dtype: int8}}"),
        "b.submodel_input.input_data.dtype", "valid: float32 (the default; or float) or int64"),
    "a misspelt input_data key": (
        dict(b_input="{a: output, input_data: {data_key: y, input_size: [4], dtpye: int64}}"),
        "b.submodel_input.input_data.dtpye", "did you mean 'dtype'"),
    "both submodel_input and submodel_inputs": (
        dict(b_extra="submodel_inputs: {a: output}"), "b.submodel_inputs", "not both"),
    "shape error of a skip declared in a later submodel": (
        dict(b_out=5, b_extra="skip_connections: {a_input: {future_layers: [b_Linear_0]}}"),
        "b.skip_connections.a_input", "add into b_Linear_0"),
}


@pytest.mark.parametrize("case", list(FIXED_MISTAKES))
def test_mistakes_are_user_errors_at_the_right_key(tmp_path, case):
    """Each is a UserError naming the file and the key path where the mistake was written (never a
    traceback, never a model that builds and fails at the first step)."""
    fields, key_path, words = FIXED_MISTAKES[case]
    fields = {"b_input": "{a: output}", "b_out": 4, "b_extra": "", "c_input": "{b: output}"} | fields
    path = tmp_path / "arch.yaml"
    path.write_text(textwrap.dedent(TWO_SUBMODELS.format(**fields)))
    with pytest.raises(UserError) as e:
        model_base.PyNet(path)
    message = str(e.value)
    assert str(path) in message and f"{key_path}:" in message and words in message, message


@pytest.mark.parametrize("layer_type, params, input_size, key_path, words", [
    ("LSTM", {"hidden_size": 4}, [5], "a.layers[0]", "whole batch as one sequence"),
    ("MultiheadAttention", {"num_heads": 1}, [2, 3, 4], "a.layers[0]", "[time, features]"),
    ("LayerNorm", None, [4, 8, 8], "a.layers[0].layer_params", "GroupNorm"),
    ("Conv2d", {"in_channels": 3, "out_channels": 2, "kernel_size": 1}, [1, 8, 8],
     "a.layers[0].layer_params.in_channels", "gives 1"),
    ("Embedding", {"num_embeddings": 10, "embedding_dim": 4}, [5], "a.layers[0]", "dtype: int64"),
    ("Linear", {"out_features": 4}, [], "a.layers[0]", "scalar per sample; give it at least one dimension"),
])
def test_inputs_a_layer_would_misread_are_refused(tmp_path, layer_type, params, input_size, key_path, words):
    """A sequence layer on a 1-D sample (torch would mix the batch), LayerNorm over only the width
    of a conv map, an input size that contradicts the input, Embedding on float data, a layer of
    values on one value a sample."""
    path, message = refusal(tmp_path, layer_type, params, input_size)
    assert path in message and f"{key_path}:" in message and words in message, message


def test_layer_norm_over_a_whole_conv_map_when_asked(tmp_path):
    model, layer = build_one_layer(tmp_path, "LayerNorm", {"normalized_shape": [4, 8, 8]}, [4, 8, 8])
    assert tuple(layer.normalized_shape) == (4, 8, 8)


@pytest.mark.slow
def test_model_base_cli_reads_paths_relative_to_the_current_folder(repo, tmp_path):
    """Like every other command-line path, `python -m engine.model_base ARCH` reads ARCH from where it runs."""
    (tmp_path / "mine.yaml").write_text((SRC / UNET_ARCH).read_text())
    proc = run(repo, "-m", "engine.model_base", "mine.yaml", cwd=tmp_path)
    assert "total: 289,682 parameters" in proc.stdout
