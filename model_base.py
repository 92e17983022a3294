"""Build models from architecture YAML: components -> submodels -> layers, with skip connections.

`PyNet(path)` reads the architecture at `path` and builds every component and submodel in it.
A model flow (models/<name>/<name>.py) subclasses PyNet and says in `forward` which submodel
feeds which; the layers, their input sizes and the skip connections all come from the YAML.

Everything a user can get wrong in an architecture is checked while building, before anything
trains or is written, and reported as a UserError naming the file and the key path.

Run `python model_base.py <architecture.yaml>` to check an architecture and print its summary.
"""
import argparse
import contextlib
import contextvars
import importlib.util
import inspect
import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

import layers as custom_layers
from config import parse_yaml, read_yaml, resolve_path
from errors import UserError, did_you_mean, lookup, run_main


def channels(shape):
    return shape[0]


def features(shape):
    return shape[-1]


# The constructor arguments that give a layer's input size, and how each is read off the previous
# layer's per-sample output shape, for every torch.nn layer that takes one. The YAML leaves them
# out (it may still give one, e.g. LayerNorm's normalized_shape over more than the last dim).
INPUT_SIZE = {
    **{f"{kind}{d}d": {"in_channels": channels} for kind in ("Conv", "ConvTranspose") for d in (1, 2, 3)},
    **{f"{kind}{d}d": {"num_features": channels} for kind in ("BatchNorm", "InstanceNorm") for d in (1, 2, 3)},
    "SyncBatchNorm": {"num_features": channels},
    "GroupNorm": {"num_channels": channels},
    "LayerNorm": {"normalized_shape": features},  # over the last dimension
    "RMSNorm": {"normalized_shape": features},
    "Linear": {"in_features": features},
    "Bilinear": {"in1_features": features, "in2_features": features},
    **{name: {"input_size": features} for name in ("RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell")},
    "MultiheadAttention": {"embed_dim": features},
    "TransformerEncoderLayer": {"d_model": features},
}
# A layer of layers.py gets these filled in by name when its constructor takes them.
CUSTOM_INPUT_SIZE = {"in_channels": channels, "num_channels": channels, "num_features": channels,
                     "in_features": features}
# torch.nn classes that cannot be a layer of a chain, and what to use instead.
CONTAINERS = ("Module", "Container", "Sequential", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict", "DataParallel")
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
    "Embedding": "takes integer indices, and data streams (and the build's shape check) are float tensors; "
                 "write a layer in layers.py that embeds x.long()",
    "EmbeddingBag": "takes integer indices, and data streams (and the build's shape check) are float tensors; "
                    "write a layer in layers.py that embeds x.long()",
}
# Layers that read a sequence [time, features] per sample; torch would take a 1-D sample as an
# unbatched sequence and mix the batch, so other shapes are refused.
SEQUENCE_LAYERS = ("RNN", "GRU", "LSTM", "MultiheadAttention", "TransformerEncoderLayer")
# Norms over the last dim that a conv map ([C, H, W]) is better normalised by giving all of it.
LAST_DIM_NORMS = ("LayerNorm", "RMSNorm")
CONNECTION_TYPES = ("add", "cat")
ADV_TYPES = ("generator", "discriminator")
SKIP_KEYS = ("future_layers", "connection_types")
SUBMODEL_KEYS = ("submodel_input", "submodel_inputs", "layer_name_prefix", "layers", "skip_connections")
SHAPE_BATCH = 2  # batch size of the meta tensors used to work out shapes (BatchNorm needs > 1)


def layer_classes():
    """Every layer type an architecture may name: torch.nn's modules, then those in layers.py."""
    table = {n: c for n, c in vars(nn).items() if isinstance(c, type) and issubclass(c, nn.Module)}
    table.update({n: c for n, c in vars(custom_layers).items() if isinstance(c, type)
                  and issubclass(c, nn.Module) and c.__module__ == custom_layers.__name__})
    return table


class Submodel(nn.Module):
    """A chain of layers; skip connections are merged right after their target layer runs.

    Call it as `sub(x, skip_dict)`. `skip_dict` carries the outputs that skips (and other
    submodels) read later in the same forward pass: pass one fresh dict through all the
    submodels of a pass. The merge plan is fixed at build time, so a forward is only the layer
    calls and the merges.
    """

    def __init__(self, name, input_name, layers, merges, kept):
        super().__init__()
        self.name, self.input_name = name, input_name
        self.layers = nn.ModuleDict(layers)
        self.keep_input = input_name in kept
        # (layer name, keep its output in skip_dict?, [(source, 'add' | 'cat'), ...])
        self._plan = [(name, name in kept, tuple(merges.get(name, ()))) for name in self.layers]

    def forward(self, x, skip_dict=None):
        if skip_dict is None:
            skip_dict = {}
        if self.keep_input:
            skip_dict[self.input_name] = x
        # values() rather than a cached list of layers: a layer swapped in later (e.g. by
        # SyncBatchNorm.convert_sync_batchnorm) is the one that runs.
        for layer, (name, keep, merges) in zip(self.layers.values(), self._plan):
            x = layer(x)
            for source, kind in merges:
                x = x + skip_dict[source] if kind == "add" else torch.cat((x, skip_dict[source]), 1)
            if keep:
                skip_dict[name] = x
        return x


class PyNet(nn.Module):
    """All components and submodels of one architecture YAML.

    `self.model_components[component][submodel]` is a Submodel. The default `forward` runs the
    non-discriminator components in YAML order, wiring submodels as their `submodel_input` says;
    a flow overrides it to spell the wiring out. `forward` is the inference path (one tensor in,
    one out) that evaluate.py shows and jit_trace_model.py traces.
    """

    target_key = None  # the data stream a generator's output is compared with (set in a flow)
    # Whether target i belongs to input i (image-to-image, regression), so evaluate.py compares
    # them pairwise; a GAN's real samples are not paired with its noise.
    paired_targets = False

    def __init__(self, architecture_cfg_path):
        super().__init__()
        path = resolve_path(architecture_cfg_path)
        self.architecture_path = str(path)
        text = _ARCHITECTURE_TEXTS.get().get(str(path))
        if text is None:
            arch = read_yaml(path, "architecture")
            text = path.read_text()
        else:
            arch = parse_yaml(text, f"{path} (as stored in the checkpoint)", "architecture")
        spec = ArchitectureBuilder(path, arch).build()
        self.architecture_text = text
        self.model_components = spec["components"]
        self.submodels = {s: sub for comp in self.model_components.values() for s, sub in comp.items()}
        self.adv_types = spec["adv_types"]
        self.sources = spec["sources"]
        self.input_key, self.input_size = spec["input_key"], spec["input_size"]
        self.rows = spec["rows"]
        # What the default forward and discriminate run, in order (worked out once, not per call).
        self._generator_submodels, self._discriminator_submodels = (
            [s for c, comp in self.model_components.items() if self.adv_types[c] == kind for s in comp]
            for kind in ADV_TYPES)

    @property
    def global_skip_outputs(self):
        """Kept so seed-style flows run unchanged: skips now live in the per-pass skip_dict,
        so there is no shared buffer, and clearing this fresh dict is a no-op."""
        return {}

    # ---- running submodels by their YAML wiring ----
    def run_submodel(self, name, values, skip_dict):
        """Run submodel `name` on its YAML inputs, read from `values` (data keys and submodel
        outputs) or `skip_dict` (layer outputs); several inputs are concatenated on dim 1."""
        inputs = [values[key] if key in values else skip_dict[key] for key in self.sources[name]]
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, 1)
        values[name] = self.submodels[name](x, skip_dict)
        return values[name]

    def forward(self, inputs):
        values, skip_dict = {self.input_key: inputs}, {}
        for name in self._generator_submodels:
            out = self.run_submodel(name, values, skip_dict)
        return out

    def discriminate(self, samples, inputs=None):
        """Discriminator scores for `samples` (real or generated). The discriminator's inputs
        from generator submodels are replaced by `samples`; data inputs come from `inputs`."""
        values, skip_dict = dict.fromkeys(self._generator_submodels, samples), {}
        if inputs is not None:
            values[self.input_key] = inputs
        for name in self._discriminator_submodels:
            out = self.run_submodel(name, values, skip_dict)
        return out

    # ---- helpers for the trainer and the scripts ----
    @property
    def has_discriminator(self):
        return "discriminator" in self.adv_types.values()

    def components_of(self, adv_type):
        """The components of one kind (generator or discriminator) as one module, sharing their
        weights: what an EMA of the generator averages, and what its saved weights load into."""
        return nn.ModuleDict({name: comp for name, comp in self.model_components.items() if self.adv_types[name] == adv_type})

    def parameters_of(self, adv_type):
        return [p for name, comp in self.model_components.items()
                if self.adv_types[name] == adv_type for p in comp.parameters()]

    def split_batch(self, batch):
        """(generator inputs, targets) of a batch dict of data streams."""
        return batch[self.input_key], batch.get(self.target_key) if self.target_key else None

    def summary(self):
        """A per-layer table: name, type, per-sample output shape, parameters, what is merged in
        (a submodel's input row names what it reads), then the parameter count of each component."""
        header = ("layer", "type", "output shape", "params", "merged in / reads")
        rows = [header] + [(r["name"], r["type"], str(list(r["shape"])), f"{r['params']:,}", r["merges"])
                           for r in self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        for name, comp in self.model_components.items():
            n = sum(p.numel() for p in comp.parameters())
            lines.append(f"{name} ({self.adv_types[name]}): {n:,} parameters")
        lines.append(f"total: {sum(p.numel() for p in self.parameters()):,} parameters")
        return "\n".join(lines)


class ArchitectureBuilder:
    """Turns one architecture dict into Submodels, checking it as it goes."""

    def __init__(self, path, arch):
        self.path, self.arch = path, arch
        self.shapes = {}   # name (data key, submodel, layer, <prefix>_input) -> per-sample shape
        self.order = {}    # layer name -> position in the forward pass
        self.owner = {}    # layer name -> submodel
        self.parsed = {}   # submodel -> [(layer_type, params), ...]
        self.names = {}    # submodel -> [<prefix>_input, <prefix>_<type>_<index>, ...]
        self.component_type = {}  # submodel -> adv_type of its component
        self.skip_where = {}  # (source, target) -> key path of the skip, for shape errors
        self.data_input = None  # (data_key, input_size) of the data stream the model reads
        self.classes = layer_classes()

    def fail(self, key_path, message):
        raise UserError(f"{self.path}: {key_path}: {message}")

    def build(self):
        components, run_order = self.read_components()
        for sname in run_order:
            self.name_layers(sname)
        merges, kept = self.read_skips(run_order)
        kept |= self.layers_read_as_inputs(run_order)
        built, rows, sources, first_input = {}, [], {}, None
        for sname in run_order:
            sources[sname], data = self.read_inputs(sname, run_order)
            first_input = first_input or data
            built[sname], sub_rows = self.build_submodel(sname, merges, kept)
            rows += [{"name": self.names[sname][0], "type": "input", "shape": self.shapes[self.names[sname][0]],
                      "params": 0, "merges": ", ".join(sources[sname])}] + sub_rows
        model_components = nn.ModuleDict({
            cname: nn.ModuleDict({s: built[s] for s in comp["submodels"]}) for cname, comp in components.items()})
        if first_input is None:
            self.fail(f"{run_order[0]}.submodel_input",
                      "no submodel reads input_data; the first one needs {input_data: {data_key: ..., input_size: [...]}}")
        return {"components": model_components, "adv_types": {c: v["adv_type"] for c, v in components.items()},
                "sources": sources, "input_key": first_input[0], "input_size": first_input[1], "rows": rows}

    def read_components(self):
        comps = self.arch.get("model_components")
        if not isinstance(comps, dict) or not comps:
            self.fail("model_components", "missing; expected e.g. "
                      "{generator: {adv_type: generator, submodels: [gen_cnn]}}")
        defined = [k for k in self.arch if k != "model_components"]
        run_order, out = [], {}
        for cname, comp in comps.items():
            where = f"model_components.{cname}"
            if not isinstance(comp, dict) or not isinstance(comp.get("submodels"), list) or not comp["submodels"]:
                self.fail(where, "expected {adv_type: generator | discriminator, submodels: [<submodel>, ...]}")
            for key in comp:
                if key not in ("adv_type", "submodels"):
                    self.fail(f"{where}.{key}", f"unknown key{did_you_mean(key, ['adv_type', 'submodels'])}; "
                              "valid: adv_type, submodels")
            adv_type = comp.get("adv_type") or "generator"
            if adv_type not in ADV_TYPES:
                self.fail(f"{where}.adv_type", f"{adv_type!r} is not one of {', '.join(ADV_TYPES)}")
            for i, sname in enumerate(comp["submodels"]):
                if sname not in defined:
                    self.fail(f"{where}.submodels[{i}]", f"submodel {sname!r} is not defined in the file"
                              f"{did_you_mean(sname, defined)}; defined: {', '.join(defined) or 'none'}")
                if sname in run_order:
                    self.fail(f"{where}.submodels[{i}]", f"submodel {sname!r} is listed twice")
                run_order.append(sname)
                self.component_type[sname] = adv_type
            out[cname] = {"adv_type": adv_type, "submodels": comp["submodels"]}
        if "generator" not in [c["adv_type"] for c in out.values()]:
            self.fail("model_components", "no generator component; the model's inference path runs its generator "
                      "components (adv_type: generator, the default)")
        for sname in defined:
            if sname not in run_order:
                self.fail(sname, "defined but not listed in any model_components entry's submodels")
        return out, run_order

    def submodel_spec(self, sname):
        spec = self.arch[sname]
        if not isinstance(spec, dict):
            self.fail(sname, "a submodel must be a mapping with submodel_input, layer_name_prefix, layers")
        for key in spec:
            if key not in SUBMODEL_KEYS:
                self.fail(f"{sname}.{key}", f"unknown key{did_you_mean(key, SUBMODEL_KEYS)}; "
                          f"valid: {', '.join(SUBMODEL_KEYS)}")
        return spec

    def name_layers(self, sname):
        """Name every layer `<prefix>_<type>_<index>` and note its place in the forward pass."""
        spec = self.submodel_spec(sname)
        prefix = spec.get("layer_name_prefix") or sname
        if not isinstance(spec.get("layers"), list) or not spec["layers"]:
            self.fail(f"{sname}.layers", "expected a non-empty list of layers, e.g. "
                      "[{layer_type: Conv2d, layer_params: {out_channels: 16, kernel_size: 3}}]")
        self.parsed[sname] = [self.parse_layer(layer, f"{sname}.layers[{i}]") for i, layer in enumerate(spec["layers"])]
        names = [f"{prefix}_input"] + [f"{prefix}_{t}_{i}" for i, (t, _) in enumerate(self.parsed[sname])]
        for name in names:
            if name in self.order:
                self.fail(f"{sname}.layer_name_prefix", f"layer name {name!r} is used twice; give each "
                          "submodel its own layer_name_prefix")
            self.order[name], self.owner[name] = len(self.order), sname
        self.names[sname] = names

    def parse_layer(self, layer, where):
        """(layer_type, params) from the long or the compact form."""
        if isinstance(layer, dict) and "layer_type" in layer:
            extra = set(layer) - {"layer_type", "layer_params"}
            if extra:
                self.fail(f"{where}.{extra.pop()}", "unknown key; valid: layer_type, layer_params")
            type_name, params = layer["layer_type"], layer.get("layer_params")
        elif isinstance(layer, dict) and len(layer) == 1:
            (type_name, params), = layer.items()
        else:
            self.fail(where, "expected {layer_type: Conv2d, layer_params: {...}} or {Conv2d: {...}}")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            self.fail(f"{where}.layer_params", f"expected a mapping of arguments, got {params!r}")
        cls = lookup(type_name, self.classes, "layer type", f"{self.path}: {where}.layer_type",
                     valid="a torch.nn module class (e.g. Conv2d, Linear, ReLU) or a class defined in layers.py")
        if type_name in NOT_A_LAYER:
            self.fail(f"{where}.layer_type", f"{type_name} {NOT_A_LAYER[type_name]}")
        if type_name.startswith("Lazy") and type_name[4:] in self.classes:
            self.fail(f"{where}.layer_type", f"{type_name} works out its input size on the first batch; use "
                      f"{type_name[4:]}, whose input size is filled in when the architecture is built")
        if issubclass(cls, nn.modules.loss._Loss):
            self.fail(f"{where}.layer_type", f"{type_name} is a loss, not a layer; losses are functions in loss.py, "
                      "named by the training config's loss.loss_fn")
        return type_name, params

    def read_skips(self, run_order):
        """target layer -> [(source, kind)], adds first then cats, sources in forward order;
        and the set of outputs that must be kept in the skip_dict."""
        merges, kept = {}, set()
        for sname in run_order:
            skips = self.arch[sname].get("skip_connections") or {}
            if not isinstance(skips, dict):
                self.fail(f"{sname}.skip_connections", "expected {<layer>: {future_layers: [...], connection_types: [...]}}")
            for source, spec in skips.items():
                where = f"{sname}.skip_connections.{source}"
                if source not in self.order:
                    self.fail(where, f"unknown source layer{did_you_mean(source, self.order)}")
                targets, kinds = self.read_skip_spec(spec, where)
                for i, (target, kind) in enumerate(zip(targets, kinds)):
                    if not isinstance(target, str):
                        self.fail(f"{where}.future_layers[{i}]", f"expected a layer name, got {target!r}")
                    if target not in self.order:
                        self.fail(f"{where}.future_layers[{i}]", f"unknown layer {target!r}{did_you_mean(target, self.order)}")
                    if target == self.names[self.owner[target]][0]:
                        self.fail(f"{where}.future_layers[{i}]", f"{target!r} is a submodel's input; a skip can "
                                  "only reach a layer")
                    self.check_crosses_into_discriminator(source, target, f"{where}.future_layers[{i}]")
                    if self.order[target] <= self.order[source]:
                        self.fail(f"{where}.future_layers[{i}]", f"{target!r} runs before {source!r}; "
                                  "a skip can only reach a later layer")
                    if kind not in CONNECTION_TYPES:
                        self.fail(f"{where}.connection_types[{i}]", f"{kind!r} is not one of {', '.join(CONNECTION_TYPES)}"
                                  f"{did_you_mean(kind, CONNECTION_TYPES)}")
                    merges.setdefault(target, []).append((source, kind))
                    self.skip_where[(source, target)] = where
                    kept.add(source)
        for target, items in merges.items():
            items.sort(key=lambda item: (item[1] != "add", self.order[item[0]]))
        return merges, kept

    def check_crosses_into_discriminator(self, source, target, where):
        """A discriminator also scores real samples, which have no generator layers to read."""
        if self.component_type[self.owner[source]] == "generator" and \
                self.component_type[self.owner[target]] == "discriminator":
            self.fail(where, f"{target!r} is in a discriminator but {source!r} in a generator; a discriminator can "
                      "only read a generator's output (submodel_input: {<generator submodel>: output})")

    def layers_read_as_inputs(self, run_order):
        """Layer outputs that a later submodel takes as its input ({<submodel>: <layer name>})."""
        read = set()
        for sname in run_order:
            entries = self.arch[sname].get("submodel_input") or self.arch[sname].get("submodel_inputs")
            if isinstance(entries, dict):  # anything else is reported by read_inputs
                read |= {value for value in entries.values() if isinstance(value, str) and value in self.order}
        return read

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

    def read_inputs(self, sname, run_order):
        """The submodel's input sources in order, and (data_key, input_size) if it reads data."""
        spec = self.arch[sname]
        if "submodel_input" in spec and "submodel_inputs" in spec:
            self.fail(f"{sname}.submodel_inputs", "give submodel_input or its synonym submodel_inputs, not both")
        key = "submodel_input" if "submodel_input" in spec else "submodel_inputs"
        entries = spec.get(key)
        if not isinstance(entries, dict) or not entries:
            self.fail(f"{sname}.submodel_input", "expected {input_data: {data_key: ..., input_size: [...]}} "
                      "or {<earlier submodel>: output}")
        sources, shapes, data = [], [], None
        for src, value in entries.items():
            where = f"{sname}.{key}.{src}"
            if src == "input_data":
                data = self.read_input_data(value, where)
                if self.data_input not in (None, data):
                    self.fail(where, f"reads {data[0]} {list(data[1])}, but the model's data input is "
                              f"{self.data_input[0]} {list(self.data_input[1])}; a model reads one data stream "
                              "(forward takes one tensor)")
                self.data_input = data
                sources.append(data[0])
                shapes.append(data[1])
                continue
            if src not in run_order:
                self.fail(where, f"unknown submodel{did_you_mean(src, run_order)}; submodels: {', '.join(run_order)}")
            if run_order.index(src) >= run_order.index(sname):
                self.fail(where, f"{src!r} does not run before {sname!r}; list submodels in dependency order")
            if not isinstance(value, str):
                self.fail(where, f"expected 'output' or a layer name of {src}, got {value!r}")
            generator_output = self.generator_output(run_order)
            if self.component_type[sname] == "discriminator" and self.component_type[src] == "generator" \
                    and src != generator_output:
                self.fail(where, f"a discriminator scores the generator's final output, {generator_output!r} "
                          f"(real samples stand in for it), so it cannot read {src!r}")
            if value == "output":
                sources.append(src)
                shapes.append(self.shapes[src])
            elif value in self.order and self.owner[value] == src:
                self.check_crosses_into_discriminator(value, self.names[sname][0], where)
                sources.append(value)
                shapes.append(self.shapes[value])
            else:
                names = ["output"] + [n for n, o in self.owner.items() if o == src]
                self.fail(where, f"{value!r} is not 'output' or a layer of {src}{did_you_mean(value, names)}")
        self.shapes[self.names[sname][0]] = self.concat_shapes(shapes, f"{sname}.{key}")
        return sources, data

    def generator_output(self, run_order):
        """The submodel whose output the default forward returns: the last generator one."""
        return [s for s in run_order if self.component_type[s] == "generator"][-1]

    def read_input_data(self, value, where):
        if not isinstance(value, dict) or not isinstance(value.get("data_key"), str):
            self.fail(where, "expected {data_key: <stream name>, input_size: [C, H, W]}")
        size = value.get("input_size")
        if not isinstance(size, list) or not size or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            self.fail(f"{where}.input_size", f"expected the per-sample shape as a list of positive ints, got {size!r}")
        return value["data_key"], tuple(size)

    def concat_shapes(self, shapes, where):
        first = shapes[0]
        for shape in shapes[1:]:
            if len(shape) != len(first) or shape[1:] != first[1:]:
                self.fail(where, f"inputs of shapes {[list(s) for s in shapes]} cannot be concatenated on the "
                          "channel dimension; all but the channel count must match")
        return (sum(s[0] for s in shapes),) + tuple(first[1:])

    def build_submodel(self, sname, merges, kept):
        names = self.names[sname]
        shape = self.shapes[names[0]]
        built, rows = {}, []
        for i, ((type_name, params), name) in enumerate(zip(self.parsed[sname], names[1:])):
            where = f"{sname}.layers[{i}]"
            layer = self.make_layer(type_name, params, shape, where)
            shape = self.output_shape(layer, shape, where, type_name)
            notes = []
            for source, kind in merges.get(name, ()):
                shape = self.merge_shape(shape, self.shapes[source], kind, self.skip_where[(source, name)], name)
                notes.append(f"{kind} {source}")
            self.shapes[name] = shape
            built[name] = layer
            rows.append({"name": name, "type": type_name, "shape": shape, "merges": ", ".join(notes),
                         "params": sum(p.numel() for p in layer.parameters())})
        self.shapes[sname] = shape
        return Submodel(sname, names[0], built, merges, kept), rows

    def make_layer(self, type_name, params, shape, where):
        cls = self.classes[type_name]
        signature = inspect.signature(cls.__init__).parameters
        if type_name in INPUT_SIZE:  # by signature too: a layers.py class may reuse a torch.nn name
            rules = {name: rule for name, rule in INPUT_SIZE[type_name].items() if name in signature}
        elif cls.__module__ == custom_layers.__name__:
            rules = {name: rule for name, rule in CUSTOM_INPUT_SIZE.items() if name in signature}
        else:
            rules = {}
        self.check_input_rank(type_name, params, shape, where)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.values())
        for name in params:
            if name not in signature and not takes_any:
                valid = [n for n in signature if n != "self" and n not in rules]
                self.fail(f"{where}.layer_params.{name}", f"{type_name} takes no argument {name!r}"
                          f"{did_you_mean(name, valid)}; valid: {', '.join(valid)}")
        kwargs = dict(params)
        for name, rule in rules.items():
            inferred = rule(shape)
            if name not in kwargs:
                kwargs[name] = inferred
            elif isinstance(kwargs[name], int) and kwargs[name] != inferred:
                self.fail(f"{where}.layer_params.{name}", f"{kwargs[name]}, but the input (per-sample shape "
                          f"{list(shape)}) gives {inferred}; leave {name} out to have it filled in")
        missing = [n for n, p in signature.items() if n != "self" and p.default is p.empty
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs]
        if missing:
            self.fail(f"{where}.layer_params", f"{type_name} needs {', '.join(missing)}")
        try:
            return cls(**kwargs)
        except Exception as e:  # the layer's own check of its arguments
            self.fail(f"{where}.layer_params", f"{type_name}({_kwargs_text(kwargs)}) failed: {e}")

    def check_input_rank(self, type_name, params, shape, where):
        """Inputs that torch would accept but read in a way nobody means."""
        if not shape:
            self.fail(where, f"{type_name} gets a scalar per sample; give it at least one dimension (Unflatten)")
        if type_name in SEQUENCE_LAYERS and len(shape) != 2:
            self.fail(where, f"{type_name} reads a sequence [time, features] per sample, but its input has per-sample "
                      f"shape {list(shape)}" + ("; with one dimension, torch would take the whole batch as one "
                                                "sequence (Unflatten it to [time, features])" if len(shape) == 1 else ""))
        if type_name in LAST_DIM_NORMS and len(shape) >= 3 and "normalized_shape" not in params:
            self.fail(f"{where}.layer_params", f"{type_name} would normalise only the last dim of {list(shape)}; give "
                      f"normalized_shape (e.g. {list(shape)} for all of it), or use GroupNorm with num_groups: 1")

    def output_shape(self, layer, shape, where, type_name):
        """The layer's per-sample output shape, worked out on the meta device (no real data)."""
        state = {k: v.to("meta") for k, v in [*layer.named_parameters(), *layer.named_buffers()]}
        try:
            y = functional_call(layer, state, (torch.empty((SHAPE_BATCH, *shape), device="meta"),))
        except Exception as e:
            self.fail(where, f"{type_name} cannot take an input of shape {list(shape)} (per sample): {e}")
        if not isinstance(y, torch.Tensor):
            self.fail(where, f"{type_name} returns a {type(y).__name__}, not a tensor; wrap it in a layer in "
                      "layers.py that returns one tensor")
        return tuple(y.shape[1:])

    def merge_shape(self, shape, source_shape, kind, where, target):
        if kind == "add":
            if shape != source_shape:
                self.fail(where, f"add into {target}: shapes {list(source_shape)} and {list(shape)} differ")
            return shape
        if len(shape) != len(source_shape) or shape[1:] != source_shape[1:]:
            self.fail(where, f"cat into {target}: shapes {list(source_shape)} and {list(shape)} differ beyond "
                      "the channel dimension")
        return (shape[0] + source_shape[0],) + shape[1:]


def _kwargs_text(kwargs):
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


_ARCHITECTURE_TEXTS = contextvars.ContextVar("architecture_texts", default={})


@contextlib.contextmanager
def architecture_text_for(path, text):
    """Within this block, a PyNet of the architecture at `path` is built from `text` instead of
    the file: how a checkpoint is rebuilt with the architecture it was trained with."""
    token = _ARCHITECTURE_TEXTS.set({**_ARCHITECTURE_TEXTS.get(), str(resolve_path(path)): text})
    try:
        yield
    finally:
        _ARCHITECTURE_TEXTS.reset(token)


def import_file(path, module_name=None):
    """Import a Python file by path (model flows live outside any package)."""
    path = Path(path)
    if str(path.parent) not in sys.path:  # so that a flow can import helper modules beside it
        sys.path.append(str(path.parent))
    name = module_name or f"flow_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise UserError(f"{path}: not a Python file (a model flow is a .py module)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_model(model_cfg):
    """The model of a run config's `model` section: the flow class built from the architecture.

    The flow module either defines `get_model_instance(**model_params)` or exactly one PyNet
    subclass, constructed as `Flow(architecture_cfg_path)`.
    """
    flow_path = resolve_path(model_cfg["model_flow_path"])
    module = import_file(flow_path)
    if hasattr(module, "get_model_instance"):
        return module.get_model_instance(architecture_cfg_path=model_cfg["architecture_cfg_path"])
    flows = [c for c in vars(module).values()
             if isinstance(c, type) and issubclass(c, PyNet) and c is not PyNet and c.__module__ == module.__name__]
    if len(flows) != 1:
        raise UserError(f"{flow_path}: expected one subclass of model_base.PyNet (or a get_model_instance "
                        f"function), found {len(flows)}: {', '.join(c.__name__ for c in flows) or 'none'}")
    return flows[0](model_cfg["architecture_cfg_path"])


def main(argv):
    parser = argparse.ArgumentParser(description="Check an architecture YAML and print its per-layer summary.",
                                     epilog="example:\n  python model_base.py models/unet_gan/unet_gan_architecture.yaml",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("architecture", help="an architecture YAML file")
    parser.add_argument("--debug", action="store_true", help="show a full traceback for errors")
    args = parser.parse_args(argv)
    print(PyNet(Path(args.architecture).resolve()).summary())  # a command-line path is relative to here


if __name__ == "__main__":
    run_main(main)
