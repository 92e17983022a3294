"""The architecture builder and the toy model, in-process."""
import re
import textwrap

import pytest
import torch
import yaml
from torch import nn

from conftest import ARCH_YAML, FLOW_PY, SRC
from engine import model_base
from engine.errors import UserError

EXAMPLE_MODEL = {"architecture_cfg_path": ARCH_YAML, "model_flow_path": FLOW_PY}


def build_example(seed=0):
    torch.manual_seed(seed)
    return model_base.build_model(EXAMPLE_MODEL).eval()


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def linear(i, o):
    return i * o + o


def conv(ci, co, k):
    return ci * co * k * k + co


def residual(ci, co, k):
    return conv(ci, co, k) + conv(co, co, k) + (conv(ci, co, 1) if ci != co else 0)


# Hand-computed from example_model_architecture.yaml.
GEN_CNN = linear(16, 64) + linear(64, 64)                                  # Flatten 1x4x4 -> 16
GEN_DEC = linear(64, 64) + residual(4, 16, 3) + conv(16, 1, 3)             # Unflatten to 4x4x4
DISC_CNN = conv(1, 16, 3) + conv(16, 32, 3) + linear(32 * 2 * 2, 1)        # stride 2: 4x4 -> 2x2


@pytest.fixture(scope="module")
def model():
    return build_example()


def test_forward_shapes_and_range(model):
    x = torch.randn(8, 1, 4, 4)
    with torch.no_grad():
        y = model(x)
        scores = model.discriminate(y)
    assert y.shape == (8, 1, 4, 4)
    assert y.min() >= -1 and y.max() <= 1
    assert scores.shape == (8, 1)


def test_parameter_counts(model):
    assert GEN_CNN == 5248 and GEN_DEC == 7297 and DISC_CNN == 4929  # the arithmetic itself
    assert n_params(model.submodels["gen_cnn"]) == GEN_CNN
    assert n_params(model.submodels["gen_dec"]) == GEN_DEC
    assert n_params(model.submodels["disc_cnn"]) == DISC_CNN
    assert n_params(model.model_components["generator"]) == GEN_CNN + GEN_DEC
    assert n_params(model.model_components["discriminator"]) == DISC_CNN
    assert n_params(model) == GEN_CNN + GEN_DEC + DISC_CNN


def test_summary_totals(model):
    text = model.summary()
    assert f"generator (generator): {GEN_CNN + GEN_DEC:,} parameters" in text
    assert f"discriminator (discriminator): {DISC_CNN:,} parameters" in text
    assert f"total: {GEN_CNN + GEN_DEC + DISC_CNN:,} parameters" in text
    # the per-layer rows add up to the total, and show names, types and shapes
    assert sum(r["params"] for r in model.rows) == GEN_CNN + GEN_DEC + DISC_CNN
    for line in ("gen_dec_ResidualBlock_2  ResidualBlock  [16, 4, 4]", "disc_cnn_Conv2d_2"):
        assert line in text
    assert "add gen_cnn_LeakyReLU_2" in text


class HandWrittenGenerator(nn.Module):
    """gen_cnn + gen_dec of the example architecture, spelled out."""

    def __init__(self):
        super().__init__()
        self.l1, self.l3 = nn.Linear(16, 64), nn.Linear(64, 64)
        self.d0 = nn.Linear(64, 64)
        self.conv1, self.conv2 = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 16, 1)
        self.out = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, z):
        a = nn.functional.leaky_relu(self.l1(z.flatten(1)), 0.2)
        b = nn.functional.leaky_relu(self.l3(a), 0.2) + a           # skip LeakyReLU_2 -> LeakyReLU_4, add
        c = self.d0(b).view(-1, 4, 4, 4)
        r = self.shortcut(c) + self.conv2(torch.relu(self.conv1(c)))
        return torch.tanh(self.out(nn.functional.leaky_relu(r, 0.2)))


def test_matches_hand_written_module(model):
    hand = HandWrittenGenerator()
    cnn, dec = model.submodels["gen_cnn"].layers, model.submodels["gen_dec"].layers
    res = dec["gen_dec_ResidualBlock_2"]
    pairs = [(hand.l1, cnn["gen_cnn_Linear_1"]), (hand.l3, cnn["gen_cnn_Linear_3"]), (hand.d0, dec["gen_dec_Linear_0"]),
             (hand.conv1, res.conv1), (hand.conv2, res.conv2), (hand.shortcut, res.shortcut),
             (hand.out, dec["gen_dec_Conv2d_4"])]
    for mine, built in pairs:
        mine.load_state_dict(built.state_dict())
    x = torch.randn(8, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(hand(x), model(x))


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = build_example(0).state_dict(), build_example(0).state_dict(), build_example(1).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_state_dict_has_no_wrapper_prefixes(model):
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in model.state_dict())


def test_submodel_skip_dict_is_optional(model):
    x = torch.randn(3, 1, 4, 4)
    sub = model.submodels["gen_cnn"]
    with torch.no_grad():
        skips = {}
        with_dict = sub(x, skips)
        assert torch.equal(sub(x), with_dict)
    assert "gen_cnn_LeakyReLU_2" in skips  # the source of the skip is kept for the pass


def write_flow(tmp_path, body, name="flow_under_test.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_seed_readme_snippet_works_in_a_flow(tmp_path, model):
    flow = write_flow(tmp_path, """
        from engine.model_base import PyNet


        class SnippetFlow(PyNet):
            def forward(self, inputs):
                new_skip_dict = {}
                generator = self.model_components['generator']
                gen_outputs = generator['gen_cnn'](inputs, new_skip_dict)
                # Reset global skip output buffer.
                self.global_skip_outputs.clear()
                return generator['gen_dec'](gen_outputs, new_skip_dict)
        """)
    snippet = model_base.build_model({"architecture_cfg_path": ARCH_YAML, "model_flow_path": str(flow)})
    assert type(snippet).__name__ == "SnippetFlow"
    snippet.load_state_dict(model.state_dict())
    x = torch.randn(5, 1, 4, 4)
    with torch.no_grad():
        first = snippet(x)
        assert torch.equal(first, model(x))
        assert torch.equal(snippet(x), first)  # nothing carried over from the previous pass


def test_get_model_instance_is_used(tmp_path):
    flow = write_flow(tmp_path, """
        from engine.model_base import PyNet


        class Flow(PyNet):
            pass


        def get_model_instance(architecture_cfg_path):
            model = Flow(architecture_cfg_path)
            model.made_by_factory = True
            return model
        """, "factory_flow.py")
    built = model_base.build_model({"architecture_cfg_path": ARCH_YAML, "model_flow_path": str(flow)})
    assert getattr(built, "made_by_factory", False)


def test_flow_without_pynet_subclass_is_user_error(tmp_path):
    flow = write_flow(tmp_path, "x = 1\n", "empty_flow.py")
    with pytest.raises(UserError, match="empty_flow.py"):
        model_base.build_model({"architecture_cfg_path": ARCH_YAML, "model_flow_path": str(flow)})


# ---- small architectures -----------------------------------------------------------------------
def arch_file(tmp_path, text, name="arch.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def build(tmp_path, text, seed=0, name="arch.yaml"):
    torch.manual_seed(seed)
    return model_base.PyNet(arch_file(tmp_path, text, name)).eval()


def layers_of(model, sub):
    return model.submodels[sub].layers


LONG_FORM = """
    model_components:
      net: {adv_type: generator, submodels: [a]}
    a:
      submodel_input: {input_data: {data_key: x, input_size: [3, 8, 8]}}
      layer_name_prefix: a
      layers:
        - {layer_type: Conv2d, layer_params: {out_channels: 5, kernel_size: 3, padding: 1}}
        - {layer_type: BatchNorm2d, layer_params: null}
        - {layer_type: ReLU}
        - {layer_type: Flatten, layer_params: null}
        - {layer_type: Linear, layer_params: {out_features: 7}}
    """
COMPACT_FORM = """
    model_components:
      net: {adv_type: generator, submodels: [a]}
    a:
      submodel_inputs: {input_data: {data_key: x, input_size: [3, 8, 8]}}
      layer_name_prefix: a
      layers:
        - {Conv2d: {out_channels: 5, kernel_size: 3, padding: 1}}
        - {BatchNorm2d: null}
        - {ReLU: null}
        - {Flatten: null}
        - {Linear: {out_features: 7}}
    """


def test_input_sizes_are_inferred(tmp_path):
    model = build(tmp_path, LONG_FORM)
    layers = layers_of(model, "a")
    assert list(layers) == ["a_Conv2d_0", "a_BatchNorm2d_1", "a_ReLU_2", "a_Flatten_3", "a_Linear_4"]
    assert layers["a_Conv2d_0"].in_channels == 3
    assert layers["a_BatchNorm2d_1"].num_features == 5
    assert layers["a_Linear_4"].in_features == 5 * 8 * 8
    assert model(torch.randn(4, 3, 8, 8)).shape == (4, 7)
    assert model.input_key == "x" and model.input_size == (3, 8, 8)


def test_compact_and_long_forms_build_the_same_model(tmp_path):
    long_model = build(tmp_path, LONG_FORM, name="long.yaml")
    compact = build(tmp_path, COMPACT_FORM, name="compact.yaml")
    a, b = long_model.state_dict(), compact.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(long_model(x), compact(x))


def test_cat_skip_widens_later_layers(tmp_path):
    model = build(tmp_path, """
        model_components:
          net: {submodels: [a]}
        a:
          submodel_input: {input_data: {data_key: x, input_size: [2, 5, 5]}}
          layer_name_prefix: a
          layers:
            - {Conv2d: {out_channels: 4, kernel_size: 3, padding: 1}}
            - {ReLU: null}
            - {Conv2d: {out_channels: 6, kernel_size: 1}}
            - {Conv2d: {out_channels: 3, kernel_size: 1}}
          skip_connections:
            a_Conv2d_0: {future_layers: [a_Conv2d_2], connection_types: [cat]}
        """)
    L = layers_of(model, "a")
    assert L["a_Conv2d_3"].in_channels == 6 + 4
    x = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        c0 = L["a_Conv2d_0"](x)
        expected = L["a_Conv2d_3"](torch.cat((L["a_Conv2d_2"](torch.relu(c0)), c0), 1))
        assert torch.equal(model(x), expected)


def test_add_then_cat_in_source_order(tmp_path):
    # Three skips reach a_Conv2d_4: cat from Conv2d_0 and Conv2d_2, add from Conv2d_3. Listed in the
    # YAML in another order; the merge is ((out + s3), s0, s2) on the channel dimension.
    model = build(tmp_path, """
        model_components:
          net: {submodels: [a]}
        a:
          submodel_input: {input_data: {data_key: x, input_size: [2, 4, 4]}}
          layer_name_prefix: a
          layers:
            - {Conv2d: {out_channels: 3, kernel_size: 1}}
            - {Tanh: null}
            - {Conv2d: {out_channels: 5, kernel_size: 1}}
            - {Conv2d: {out_channels: 4, kernel_size: 1}}
            - {Conv2d: {out_channels: 4, kernel_size: 1}}
            - {Conv2d: {out_channels: 2, kernel_size: 1}}
          skip_connections:
            a_Conv2d_2: {future_layers: [a_Conv2d_4], connection_types: [cat]}
            a_Conv2d_3: {future_layers: [a_Conv2d_4], connection_types: [add]}
            a_Conv2d_0: {future_layers: [a_Conv2d_4], connection_types: [cat]}
        """)
    L = layers_of(model, "a")
    assert L["a_Conv2d_5"].in_channels == 4 + 3 + 5
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        c0 = L["a_Conv2d_0"](x)
        c2 = L["a_Conv2d_2"](torch.tanh(c0))
        c3 = L["a_Conv2d_3"](c2)
        c4 = L["a_Conv2d_4"](c3)
        expected = L["a_Conv2d_5"](torch.cat((c4 + c3, c0, c2), 1))
        assert torch.equal(model(x), expected)


def test_skip_across_submodels_and_components(tmp_path):
    model = build(tmp_path, """
        model_components:
          first: {adv_type: generator, submodels: [a, b]}
          second: {adv_type: generator, submodels: [c]}
        a:
          submodel_input: {input_data: {data_key: x, input_size: [6]}}
          layer_name_prefix: a
          layers: [{Linear: {out_features: 8}}, {Tanh: null}]
          skip_connections:
            a_Linear_0: {future_layers: [b_Linear_0, c_Linear_1], connection_types: [add, cat]}
        b:
          submodel_input: {a: output}
          layer_name_prefix: b
          layers: [{Linear: {out_features: 8}}]
        c:
          submodel_input: {b: output}
          layer_name_prefix: c
          layers: [{Linear: {out_features: 5}}, {Linear: {out_features: 3}}, {Linear: {out_features: 2}}]
        """)
    A, B, C = layers_of(model, "a"), layers_of(model, "b"), layers_of(model, "c")
    assert C["c_Linear_2"].in_features == 3 + 8
    x = torch.randn(4, 6)
    with torch.no_grad():
        a0 = A["a_Linear_0"](x)
        b = B["b_Linear_0"](torch.tanh(a0)) + a0
        c1 = torch.cat((C["c_Linear_1"](C["c_Linear_0"](b)), a0), 1)
        expected = C["c_Linear_2"](c1)
        assert torch.equal(model(x), expected)


def test_submodel_with_two_inputs_concatenates_them(tmp_path):
    model = build(tmp_path, """
        model_components:
          net: {submodels: [a, b, c]}
        a:
          submodel_input: {input_data: {data_key: x, input_size: [1, 4, 4]}}
          layer_name_prefix: a
          layers: [{Conv2d: {out_channels: 2, kernel_size: 3, padding: 1}}, {ReLU: null}]
        b:
          submodel_input: {a: output}
          layer_name_prefix: b
          layers: [{Conv2d: {out_channels: 3, kernel_size: 1}}]
        c:
          submodel_input: {b: output, a: a_Conv2d_0}
          layer_name_prefix: c
          layers: [{Conv2d: {out_channels: 1, kernel_size: 1}}]
        """)
    A, B, C = layers_of(model, "a"), layers_of(model, "b"), layers_of(model, "c")
    assert C["c_Conv2d_0"].in_channels == 3 + 2
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        a0 = A["a_Conv2d_0"](x)
        b = B["b_Conv2d_0"](torch.relu(a0))
        assert torch.equal(model(x), C["c_Conv2d_0"](torch.cat((b, a0), 1)))


def test_submodel_input_as_skip_source(tmp_path):
    model = build(tmp_path, """
        model_components:
          net: {submodels: [a]}
        a:
          submodel_input: {input_data: {data_key: x, input_size: [2, 3, 3]}}
          layer_name_prefix: a
          layers: [{Conv2d: {out_channels: 2, kernel_size: 1}}, {Conv2d: {out_channels: 4, kernel_size: 1}},
                   {Conv2d: {out_channels: 1, kernel_size: 1}}]
          skip_connections:
            a_input: {future_layers: [a_Conv2d_0, a_Conv2d_1], connection_types: [add, cat]}
        """)
    L = layers_of(model, "a")
    assert L["a_Conv2d_2"].in_channels == 4 + 2
    x = torch.randn(3, 2, 3, 3)
    with torch.no_grad():
        h = L["a_Conv2d_0"](x) + x
        h = torch.cat((L["a_Conv2d_1"](h), x), 1)
        assert torch.equal(model(x), L["a_Conv2d_2"](h))


def test_custom_layer_from_layers_py(tmp_path):
    model = build(tmp_path, """
        model_components:
          net: {submodels: [a]}
        a:
          submodel_input: {input_data: {data_key: x, input_size: [3, 4, 4]}}
          layer_name_prefix: a
          layers: [{ResidualBlock: {out_channels: 3}}, {ResidualBlock: {out_channels: 5}}]
        """)
    L = layers_of(model, "a")
    assert isinstance(L["a_ResidualBlock_0"].shortcut, nn.Identity)   # same channel count: no 1x1 conv
    assert n_params(L["a_ResidualBlock_1"]) == residual(3, 5, 3)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 5, 4, 4)


ARCH_ERRORS = {
    "unknown layer type": ("a.layers[0].layer_type", "did you mean 'Conv2d'",
                           lambda a: a["a"]["layers"].__setitem__(0, {"Conv2D": {"out_channels": 2,
                                                                                 "kernel_size": 1}})),
    "unknown layer param": ("a.layers[0].layer_params.kernal_size", "did you mean 'kernel_size'",
                            lambda a: a["a"]["layers"].__setitem__(0, {"Conv2d": {"out_channels": 2,
                                                                                  "kernal_size": 1}})),
    "missing layer param": ("a.layers[0].layer_params", "out_channels",
                            lambda a: a["a"]["layers"].__setitem__(0, {"Conv2d": {"kernel_size": 1}})),
    "skip to an earlier layer": ("a.skip_connections.a_ReLU_1.future_layers[0]", "runs before",
                                 lambda a: a["a"].__setitem__("skip_connections", {
                                     "a_ReLU_1": {"future_layers": ["a_Conv2d_0"], "connection_types": ["add"]}})),
    "unknown skip target": ("a.skip_connections.a_Conv2d_0.future_layers[0]", "did you mean 'b_Conv2d_0'",
                            lambda a: a["a"].__setitem__("skip_connections", {
                                "a_Conv2d_0": {"future_layers": ["b_Conv2d_O"], "connection_types": ["add"]}})),
    "unknown connection type": ("a.skip_connections.a_Conv2d_0.connection_types[0]", "did you mean 'cat'",
                                lambda a: a["a"].__setitem__("skip_connections", {
                                    "a_Conv2d_0": {"future_layers": ["b_Conv2d_0"], "connection_types": ["cta"]}})),
    "add of different shapes": ("a.skip_connections.a_input", "differ",
                                lambda a: a["a"].__setitem__("skip_connections", {
                                    "a_input": {"future_layers": ["a_ReLU_1"], "connection_types": ["add"]}})),
    "submodel reads a later one": ("a.submodel_input.b", "does not run before",
                                   lambda a: a["a"].__setitem__("submodel_input", {"b": "output"})),
    "undefined submodel": ("model_components.net.submodels[1]", "did you mean 'b'",
                           lambda a: a["model_components"]["net"].__setitem__("submodels", ["a", "bb"])),
    "layer cannot take the input": ("b.layers[0]", "cannot take an input",
                                    lambda a: a["b"]["layers"].__setitem__(0, {"Conv1d": {"out_channels": 1,
                                                                                            "kernel_size": 1}})),
    "duplicate prefix": ("b.layer_name_prefix", "used twice",
                         lambda a: a["b"].__setitem__("layer_name_prefix", "a")),
}
GOOD = {
    "model_components": {"net": {"adv_type": "generator", "submodels": ["a", "b"]}},
    "a": {"submodel_input": {"input_data": {"data_key": "x", "input_size": [1, 4, 4]}}, "layer_name_prefix": "a",
          "layers": [{"Conv2d": {"out_channels": 2, "kernel_size": 1}}, {"ReLU": None}]},
    "b": {"submodel_input": {"a": "output"}, "layer_name_prefix": "b",
          "layers": [{"Conv2d": {"out_channels": 1, "kernel_size": 1}}]},
}


def test_good_small_architecture_builds(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert model_base.PyNet(path)(torch.randn(2, 1, 4, 4)).shape == (2, 1, 4, 4)


@pytest.mark.parametrize("case", list(ARCH_ERRORS))
def test_architecture_errors_name_file_and_key_path(tmp_path, case):
    key_path, hint, mutate = ARCH_ERRORS[case]
    arch = yaml.safe_load(yaml.safe_dump(GOOD))
    mutate(arch)
    path = tmp_path / "bad_arch.yaml"
    path.write_text(yaml.safe_dump(arch, sort_keys=False))
    with pytest.raises(UserError) as e:
        model_base.PyNet(path)
    message = str(e.value)
    assert str(path) in message and key_path in message and hint in message, message


@pytest.mark.parametrize("typo, meant", [("relu", "ReLU"), ("linear", "Linear")])
def test_case_typos_of_layer_types_get_the_right_hint(tmp_path, typo, meant):
    arch = yaml.safe_load(yaml.safe_dump(GOOD))
    arch["a"]["layers"][1] = {typo: None} if typo != "linear" else {typo: {"out_features": 2}}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(arch, sort_keys=False))
    with pytest.raises(UserError, match=re.escape(f"did you mean '{meant}'")):
        model_base.PyNet(path)


def test_example_architecture_file_is_the_one_built():
    model = build_example()
    assert model.architecture_text == (SRC / ARCH_YAML).read_text()
