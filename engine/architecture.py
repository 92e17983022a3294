"""Reading an architecture YAML into a plan: what to build, checked before anything is built.

`read_architecture(path, arch)` checks everything in an architecture that needs no shapes: the
components and their submodels, the layers' forms and types, the layer names
`<prefix>_<type>_<index>`, the layers' parametrizations, what each submodel reads (earlier
submodels, or data streams with their per-sample shapes and dtypes), and the skip connections
(their sources, targets, order and kinds). It returns an ArchitecturePlan of plain values;
model_base.py builds the modules from it, works out every shape and makes the checks that need
shapes.

Every mistake raises a UserError naming the file and the key path, e.g.
`gen_cnn.skip_connections.gen_cnn_Conv2d_0.future_layers[0]`.
"""
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from engine.errors import UserError, did_you_mean, dtype_name, shown
from engine.registry import layer_types, lookup, parametrizations

# torch.nn classes that cannot be a layer of a chain, and what to use instead.
CONTAINERS = ("Module", "Container", "Sequential", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict",
              "DataParallel")
NOT_A_LAYER = {
    **{name: "is a container, not a layer; list its layers in the submodel instead" for name in CONTAINERS},
    "Transformer": "takes a source and a target sequence; stack TransformerEncoderLayer entries, or write a "
                   "layer in layers.py",
    "TransformerDecoderLayer": "takes the target sequence and the encoder's memory; write a layer in layers.py",
    "TransformerEncoder": "takes a layer object; list TransformerEncoderLayer entries instead",
    "TransformerDecoder": "takes a layer object; write a layer in layers.py",
    "AdaptiveLogSoftmaxWithLoss": "needs the targets in forward; it is a loss, not a layer",
    "RNNBase": "is the base class of RNN, GRU and LSTM; use one of those",
    "RNNCellBase": "is the base class of RNNCell, GRUCell and LSTMCell; use one of those",
}
LAYER_TYPES_TEXT = "a torch.nn module class (e.g. Conv2d, Linear, ReLU) or a class defined in layers.py"
CONNECTION_TYPES = ("add", "cat")
ADV_TYPES = ("generator", "discriminator")
COMPONENT_KEYS = ("adv_type", "submodels")
SUBMODEL_KEYS = ("submodel_input", "submodel_inputs", "layer_name_prefix", "layers", "skip_connections")
SKIP_KEYS = ("future_layers", "connection_types")
LAYER_KEYS = ("layer_type", "layer_params", "parametrization")
DATA_KEYS = ("data_key", "input_size", "dtype")
# input_data's dtype: float32 (the default) for values, int64 for indices (class labels an Embedding
# reads); the other spelling of each is accepted too. Other dtypes are the pipeline's to set
# (training.precision), so a stream is one of these two.
DTYPES = {"float32": torch.float32, "float": torch.float32, "int64": torch.int64, "long": torch.int64}
DTYPES_TEXT = "float32 (the default; or float) or int64 (class indices, e.g. for an Embedding; or long)"
# The names torch.nn.ModuleDict refuses to hold a module under: components, a component's submodels
# and a submodel's layers are the entries of one, and its add_module refuses a name that is already
# an attribute (keys, items, training, forward, ...). Nothing else holds them by name: the flow and
# PyNet reach them as model_components[<component>][<submodel>], never as attributes.
TAKEN_NAMES = frozenset(dir(nn.ModuleDict()))


# ---- the plan ----------------------------------------------------------------------------------
@dataclass
class ComponentPlan:
    """One entry of model_components: a network whose submodels run in the order listed."""

    adv_type: str   # generator | discriminator
    submodels: list  # submodel names


class LayerPlan(NamedTuple):
    """One layer of a submodel, as the YAML gives it."""

    type_name: str
    params: dict
    parametrization: tuple = None  # (name, {argument: value}) of torch.nn.utils.parametrizations, or None


class DataInput(NamedTuple):
    """A data stream the model reads: its per-sample shape (() for one value a sample) and dtype."""

    size: tuple
    dtype: torch.dtype


@dataclass
class SubmodelPlan:
    """One submodel: its layers, named and parsed, and the inputs it concatenates on dim 1."""

    name: str
    adv_type: str     # its component's
    prefix: str       # layer_name_prefix (the submodel's name when left out)
    layer_names: list  # [<prefix>_<type>_<index>, ...]
    layers: list       # [LayerPlan, ...], one per layer name
    input_key: str = "submodel_input"  # as the YAML spells it (or its synonym submodel_inputs)
    inputs: list = field(default_factory=list)  # [(source, 'data' | 'output' | 'layer'), ...]

    @property
    def input_name(self):
        """`<prefix>_input`: the name of what the submodel reads, which a skip may start from."""
        return f"{self.prefix}_input"

    @property
    def sources(self):
        """What it reads, in order: a data key, a submodel (its output) or a layer name."""
        return [source for source, _ in self.inputs]

    @property
    def input_where(self):
        return f"{self.name}.{self.input_key}"

    def layer_where(self, i):
        return f"{self.name}.layers[{i}]"


@dataclass
class ArchitecturePlan:
    """A checked architecture: what model_base.py builds, as plain values."""

    path: Path
    components: dict   # component name -> ComponentPlan, in YAML order
    submodels: dict    # submodel name -> SubmodelPlan, in run order (the components', each in its list's order)
    merges: dict       # target layer -> [(source, 'add' | 'cat')]: adds first, then cats, sources in forward order
    merge_where: dict  # (source, target) -> key path of the skip, for the shape errors of the merge
    kept: set          # outputs read later (by skips and submodel inputs), kept in the pass's skip_dict
    data_inputs: dict  # data key -> DataInput, in the order submodels first read them: forward's inputs

    @property
    def run_order(self):
        return list(self.submodels)

    @property
    def input_key(self):
        """The first data stream (the only one of most models)."""
        return next(iter(self.data_inputs))

    @property
    def input_size(self):
        return self.data_inputs[self.input_key].size


def read_architecture(path, arch):
    """The ArchitecturePlan of the architecture dict `arch` read from `path`, or a UserError.
    Checks run in this order: components, layers, skip connections, submodel inputs."""
    layers = LayerReader(path, arch)
    components, submodels = layers.read()
    merges, merge_where, kept, data_inputs = WiringReader(path, arch, layers).read()
    return ArchitecturePlan(path, components, submodels, merges, merge_where, kept, data_inputs)


# ---- reading -----------------------------------------------------------------------------------
def fail_at(path, key_path, message):
    """A user error at `key_path` of the architecture file `path`."""
    raise UserError(f"{path}: {key_path}: {message}")


class Reader:
    """What both readers share: the file, its dict, and a way to fail at a key path."""

    def __init__(self, path, arch):
        self.path, self.arch = path, arch

    def fail(self, key_path, message):
        fail_at(self.path, key_path, message)

    def check_name(self, key_path, name, what):
        """Component, submodel and layer names become torch module names and YAML keys that flows
        index: each must be an identifier (letters, digits, underscores; not a digit first)."""
        if not isinstance(name, str) or not name.isidentifier():
            self.fail(key_path, f"{what} {shown(name)} is not a valid name: use letters, digits and underscores, not "
                                "starting with a digit (e.g. gen_cnn)")

    def check_free(self, key_path, name, what):
        """A component or submodel name that torch.nn.ModuleDict can hold (TAKEN_NAMES). (A layer's
        is <prefix>_<type>_<index>, which ends in a digit, as none of its attributes does.)"""
        if name in TAKEN_NAMES:
            kind = "a method" if callable(getattr(nn.ModuleDict, name, None)) else "an attribute"
            self.fail(key_path, f"{what} {shown(name)} is taken: torch.nn.ModuleDict, which holds the components, "
                      f"submodels and layers by name, has {kind} of that name; rename it, e.g. {name.strip('_')}_net")


class LayerReader(Reader):
    """The components, their submodels and every submodel's layers, named and placed in the
    forward pass."""

    def __init__(self, path, arch):
        super().__init__(path, arch)
        self.order = {}      # layer name (and <prefix>_input) -> position in the forward pass
        self.owner = {}      # layer name -> its submodel
        self.submodels = {}  # submodel name -> SubmodelPlan, in run order

    def read(self):
        """({component: ComponentPlan}, {submodel: SubmodelPlan} in run order, inputs not yet read)."""
        components, adv_types = self.read_components()
        for sname, adv_type in adv_types.items():
            self.submodels[sname] = self.read_layers(sname, adv_type)
        return components, self.submodels

    # ---- components ----
    def read_components(self):
        """({component: ComponentPlan}, {submodel: adv_type} in run order)."""
        comps = self.arch.get("model_components")
        if not isinstance(comps, dict) or not comps:
            self.fail("model_components", "missing; expected e.g. "
                      "{generator: {adv_type: generator, submodels: [gen_cnn]}}")
        defined = [k for k in self.arch if k != "model_components"]
        for sname in defined:
            self.check_name(shown(sname) if not isinstance(sname, str) else sname, sname, "the submodel")
            self.check_free(sname, sname, "the submodel")
        components, adv_types = {}, {}
        for cname, comp in comps.items():
            self.check_name(f"model_components.{cname}", cname, "the component")
            self.check_free(f"model_components.{cname}", cname, "the component")
            components[cname] = self.read_component(cname, comp, defined, adv_types)
        if "generator" not in [c.adv_type for c in components.values()]:
            self.fail("model_components", "no generator component; the model's inference path runs its generator "
                      "components (adv_type: generator, the default)")
        for sname in defined:
            if sname not in adv_types:
                self.fail(sname, "defined but not listed in any model_components entry's submodels")
        return components, adv_types

    def read_component(self, cname, comp, defined, adv_types):
        """One model_components entry; its submodels join `adv_types` (the run order so far)."""
        where = f"model_components.{cname}"
        if not isinstance(comp, dict) or not isinstance(comp.get("submodels"), list) or not comp["submodels"]:
            self.fail(where, "expected {adv_type: generator | discriminator, submodels: [<submodel>, ...]}")
        for key in comp:
            if key not in COMPONENT_KEYS:
                self.fail(f"{where}.{key}", f"unknown key{did_you_mean(key, COMPONENT_KEYS)}; "
                          f"valid: {', '.join(COMPONENT_KEYS)}")
        adv_type = comp.get("adv_type") or "generator"
        if adv_type not in ADV_TYPES:
            self.fail(f"{where}.adv_type", f"{shown(adv_type)} is not one of {', '.join(ADV_TYPES)}")
        for i, sname in enumerate(comp["submodels"]):
            self.check_name(f"{where}.submodels[{i}]", sname, "the submodel")
            if sname not in defined:
                self.fail(f"{where}.submodels[{i}]", f"submodel {shown(sname)} is not defined in the file"
                          f"{did_you_mean(sname, defined)}; defined: {', '.join(defined) or 'none'}")
            if sname in adv_types:
                self.fail(f"{where}.submodels[{i}]", f"submodel {shown(sname)} is listed twice")
            adv_types[sname] = adv_type
        return ComponentPlan(adv_type, comp["submodels"])

    # ---- layers ----
    def submodel_spec(self, sname):
        spec = self.arch[sname]
        if not isinstance(spec, dict):
            self.fail(sname, "a submodel must be a mapping with submodel_input, layer_name_prefix, layers")
        for key in spec:
            if key not in SUBMODEL_KEYS:
                self.fail(f"{sname}.{key}", f"unknown key{did_you_mean(key, SUBMODEL_KEYS)}; "
                          f"valid: {', '.join(SUBMODEL_KEYS)}")
        return spec

    def read_layers(self, sname, adv_type):
        """The submodel's layers, each named `<prefix>_<type>_<index>` and placed in the forward pass."""
        spec = self.submodel_spec(sname)
        prefix = spec.get("layer_name_prefix")
        if prefix is None:
            prefix = sname  # (left out or null: the submodel's name)
        self.check_name(f"{sname}.layer_name_prefix", prefix, "the layer name prefix")
        if not isinstance(spec.get("layers"), list) or not spec["layers"]:
            self.fail(f"{sname}.layers", "expected a non-empty list of layers, e.g. "
                      "[{layer_type: Conv2d, layer_params: {out_channels: 16, kernel_size: 3}}]")
        layers = [self.parse_layer(layer, f"{sname}.layers[{i}]") for i, layer in enumerate(spec["layers"])]
        names = [f"{prefix}_{layer.type_name}_{i}" for i, layer in enumerate(layers)]
        sub = SubmodelPlan(sname, adv_type, prefix, names, layers)
        for name in [sub.input_name, *sub.layer_names]:
            if name in self.order:
                self.fail(f"{sname}.layer_name_prefix", f"layer name {shown(name)} is used twice; give each "
                          "submodel its own layer_name_prefix")
            self.order[name], self.owner[name] = len(self.order), sname
        return sub

    def parse_layer(self, layer, where):
        """The LayerPlan of the long or the compact form, either with an optional parametrization."""
        # (the compact form's one key besides parametrization is the layer type)
        named = [key for key in layer if key != "parametrization"] if isinstance(layer, dict) else []
        if isinstance(layer, dict) and "layer_type" in layer:
            extra = set(layer) - set(LAYER_KEYS)
            if extra:
                key = extra.pop()
                self.fail(f"{where}.{key}", f"unknown key{did_you_mean(key, LAYER_KEYS)}; valid: "
                          f"{', '.join(LAYER_KEYS)}")
            type_name, params = layer["layer_type"], layer.get("layer_params")
        elif len(named) == 1:
            type_name, params = named[0], layer[named[0]]
        else:
            self.fail(where, "expected {layer_type: Conv2d, layer_params: {...}} or {Conv2d: {...}}, either with an "
                      "optional parametrization: spectral_norm")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            self.fail(f"{where}.layer_params", f"expected a mapping of arguments, got {shown(params)}")
        self.check_layer_type(type_name, where)
        parametrization = parse_parametrization(layer.get("parametrization"), f"{where}.parametrization", self.path)
        return LayerPlan(type_name, params, parametrization)

    def check_layer_type(self, type_name, where):
        """A class an architecture may name, and one that works as a layer of a chain."""
        classes = layer_types()
        cls = lookup(type_name, classes, "layer type", f"{self.path}: {where}.layer_type", valid=LAYER_TYPES_TEXT)
        if type_name in NOT_A_LAYER:
            self.fail(f"{where}.layer_type", f"{type_name} {NOT_A_LAYER[type_name]}")
        if type_name.startswith("Lazy") and type_name[4:] in classes:
            self.fail(f"{where}.layer_type", f"{type_name} works out its input size on the first batch; use "
                      f"{type_name[4:]}, whose input size is filled in when the architecture is built")
        if issubclass(cls, nn.modules.loss._Loss):
            self.fail(f"{where}.layer_type", f"{type_name} is a loss, not a layer; losses are functions in loss.py, "
                      "named by the training config's loss.loss_fn")


def parse_parametrization(spec, where, path):
    """(name, arguments) of a layer's `parametrization` (a function of
    torch.nn.utils.parametrizations, applied to the built layer): a name, or {name: {args}}."""
    if spec is None:
        return None
    if isinstance(spec, str):
        name, args = spec, {}
    elif isinstance(spec, dict) and len(spec) == 1:
        (name, args), = spec.items()
    else:
        fail_at(path, where, f"expected a name ({', '.join(parametrizations())}) or a name with its arguments, e.g. "
                  f"{{spectral_norm: {{n_power_iterations: 1}}}}; got {shown(spec)}")
    fn = lookup(name, parametrizations(), "parametrization", f"{path}: {where}")
    args = {} if args is None else args
    if not isinstance(args, dict):
        fail_at(path, f"{where}.{name}", f"expected a mapping of arguments, got {shown(args)}")
    valid = [n for n in inspect.signature(fn).parameters if n != "module"]
    for arg in args:
        if arg not in valid:
            fail_at(path, f"{where}.{name}.{arg}", f"{name} takes no argument {shown(arg)}{did_you_mean(arg, valid)}; "
                      f"valid: {', '.join(valid)}")
    return name, args


class WiringReader(Reader):
    """The skip connections and the submodels' inputs, read once every layer has its name."""

    def __init__(self, path, arch, layers):
        super().__init__(path, arch)
        self.order, self.owner, self.submodels = layers.order, layers.owner, layers.submodels
        self.data_inputs = {}  # data key -> DataInput, in the order submodels first read them
        self.data_where = {}   # data key -> the key path that first read it

    def read(self):
        """(merges, their key paths, the outputs to keep, {data key: DataInput}); each submodel
        plan gets its inputs."""
        merges, merge_where, kept = self.read_skips()
        for sub in self.submodels.values():
            sub.input_key, sub.inputs = self.read_inputs(sub)
        kept |= {source for sub in self.submodels.values() for source, kind in sub.inputs if kind == "layer"}
        if not self.data_inputs:
            self.fail(f"{next(iter(self.submodels))}.submodel_input", "no submodel reads input_data; the first one "
                      "needs {input_data: {data_key: ..., input_size: [...]}}")
        return merges, merge_where, kept, self.data_inputs

    # ---- skip connections ----
    def read_skips(self):
        """target layer -> [(source, kind)], adds first then cats, sources in forward order; the
        key path of each skip; and the set of sources, whose outputs the skip_dict keeps."""
        merges, merge_where = {}, {}
        for sname in self.submodels:
            skips = self.arch[sname].get("skip_connections") or {}
            if not isinstance(skips, dict):
                self.fail(f"{sname}.skip_connections",
                          "expected {<layer>: {future_layers: [...], connection_types: [...]}}")
            for source, spec in skips.items():
                where = f"{sname}.skip_connections.{source}"
                if source not in self.order:
                    self.fail(where, f"unknown source layer{did_you_mean(source, self.order)}")
                for target, kind in self.read_skip(source, spec, where):
                    merges.setdefault(target, []).append((source, kind))
                    merge_where[(source, target)] = where
        for items in merges.values():
            items.sort(key=lambda item: (item[1] != "add", self.order[item[0]]))
        return merges, merge_where, {source for source, _ in merge_where}

    def read_skip(self, source, spec, where):
        """[(target, kind), ...] of one skip connection's entry, each target checked."""
        targets, kinds = self.read_skip_spec(spec, where)
        for i, (target, kind) in enumerate(zip(targets, kinds)):
            self.check_skip_target(source, target, f"{where}.future_layers[{i}]")
            if kind not in CONNECTION_TYPES:
                self.fail(f"{where}.connection_types[{i}]", f"{shown(kind)} is not one of {', '.join(CONNECTION_TYPES)}"
                          f"{did_you_mean(kind, CONNECTION_TYPES)}")
        return list(zip(targets, kinds))

    def read_skip_spec(self, spec, where):
        if not isinstance(spec, dict) or not isinstance(spec.get("future_layers"), list):
            self.fail(where, "expected {future_layers: [<layer>, ...], connection_types: [add | cat, ...]}")
        for key in spec:
            if key not in SKIP_KEYS:
                self.fail(f"{where}.{key}", f"unknown key{did_you_mean(key, SKIP_KEYS)}; valid: {', '.join(SKIP_KEYS)}")
        targets, kinds = spec["future_layers"], spec.get("connection_types", ["add"] * len(spec["future_layers"]))
        if not isinstance(kinds, list) or len(kinds) != len(targets):
            self.fail(f"{where}.connection_types", f"needs one entry per future layer ({len(targets)})")
        return targets, kinds

    def check_skip_target(self, source, target, where):
        if not isinstance(target, str):
            self.fail(where, f"expected a layer name, got {shown(target)}")
        if target not in self.order:
            self.fail(where, f"unknown layer {shown(target)}{did_you_mean(target, self.order)}")
        if target == self.submodels[self.owner[target]].input_name:
            self.fail(where, f"{shown(target)} is a submodel's input; a skip can only reach a layer")
        self.check_crosses_into_discriminator(source, target, where)
        if self.order[target] <= self.order[source]:
            self.fail(where, f"{shown(target)} runs before {shown(source)}; a skip can only reach a later layer")

    def check_crosses_into_discriminator(self, source, target, where):
        """A discriminator also scores real samples, which have no generator layers to read."""
        if self.submodels[self.owner[source]].adv_type == "generator" and \
                self.submodels[self.owner[target]].adv_type == "discriminator":
            self.fail(where, f"{shown(target)} is in a discriminator but {shown(source)} in a generator; a "
                      "discriminator can only read a generator's output (submodel_input: {<generator submodel>: "
                      "output})")

    # ---- submodel inputs ----
    def read_inputs(self, sub):
        """(the key the YAML gives them under, [(source, kind), ...]) of the submodel's inputs."""
        spec, sname = self.arch[sub.name], sub.name
        if "submodel_input" in spec and "submodel_inputs" in spec:
            self.fail(f"{sname}.submodel_inputs", "give submodel_input or its synonym submodel_inputs, not both")
        key = "submodel_input" if "submodel_input" in spec else "submodel_inputs"
        entries = spec.get(key)
        if not isinstance(entries, dict) or not entries:
            self.fail(f"{sname}.submodel_input", "expected {input_data: {data_key: ..., input_size: [...]}} "
                      "or {<earlier submodel>: output}")
        return key, [self.read_data_input(value, f"{sname}.{key}.{src}") if src == "input_data"
                     else self.read_submodel_input(sub, src, value, f"{sname}.{key}.{src}")
                     for src, value in entries.items()]

    def read_data_input(self, value, where):
        """('<data key>', 'data'). Each stream read is one of the model's inputs (its forward takes one
        tensor per stream, in the order submodels first read them); submodels reading one stream
        must agree on its per-sample shape and dtype."""
        if not isinstance(value, dict) or not isinstance(value.get("data_key"), str):
            self.fail(where, "expected {data_key: <stream name>, input_size: [C, H, W]} (optionally dtype: int64)")
        for key in value:
            if key not in DATA_KEYS:
                self.fail(f"{where}.{key}", f"unknown key{did_you_mean(key, DATA_KEYS)}; valid: "
                          f"{', '.join(DATA_KEYS)}")
        size = value.get("input_size")
        if not isinstance(size, list) or \
                not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            self.fail(f"{where}.input_size", "expected the per-sample shape as a list of positive ints ([] for one "
                      f"value a sample, e.g. a class index), got {shown(size)}")
        dtype = "float32" if value.get("dtype") is None else value["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            self.fail(f"{where}.dtype", f"{shown(dtype)} is not a stream dtype{did_you_mean(dtype, DTYPES)}; valid: "
                      f"{DTYPES_TEXT}")
        key, data = value["data_key"], DataInput(tuple(size), DTYPES[dtype])
        if key in self.submodels:  # (PyNet's forward and discriminate look both up in one dict)
            self.fail(f"{where}.data_key", f"{shown(key)} is also a submodel's name; a submodel's output and the "
                      f"data stream it reads would be one name: rename the submodel, e.g. {key}_net")
        if self.data_inputs.setdefault(key, data) != data:
            first = self.data_inputs[key]
            self.fail(where, f"reads {key} as {described(data)}, but {self.data_where[key]} reads it as "
                      f"{described(first)}; a stream has one per-sample shape and dtype")
        self.data_where.setdefault(key, where)
        return key, "data"

    def read_submodel_input(self, sub, src, value, where):
        """(source, 'output' | 'layer') of an input `{<earlier submodel>: output | <its layer>}`."""
        run_order = list(self.submodels)
        if src not in run_order:
            self.fail(where, f"unknown submodel{did_you_mean(src, run_order)}; submodels: {', '.join(run_order)}")
        if run_order.index(src) >= run_order.index(sub.name):
            self.fail(where, f"{shown(src)} does not run before {shown(sub.name)}; list submodels in dependency order")
        if not isinstance(value, str):
            self.fail(where, f"expected 'output' or a layer name of {src}, got {shown(value)}")
        generator_output = [s for s, plan in self.submodels.items() if plan.adv_type == "generator"][-1]
        if sub.adv_type == "discriminator" and self.submodels[src].adv_type == "generator" and src != generator_output:
            self.fail(where, f"a discriminator scores the generator's final output, {shown(generator_output)} "
                      f"(real samples stand in for it), so it cannot read {shown(src)}")
        if value == "output":
            return src, "output"
        if value in self.order and self.owner[value] == src:
            self.check_crosses_into_discriminator(value, sub.input_name, where)
            return value, "layer"
        names = ["output"] + [n for n, o in self.owner.items() if o == src]
        self.fail(where, f"{shown(value)} is not 'output' or a layer of {src}{did_you_mean(value, names)}")


def described(data):
    """'[1, 4, 4] float32': a DataInput as the messages show it."""
    return f"{list(data.size)} {dtype_name(data.dtype)}"
