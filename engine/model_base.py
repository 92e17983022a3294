"""Build models from architecture YAML: components -> submodels -> layers, with skip connections.

`PyNet(path)` reads the architecture at `path` and builds every component and submodel in it.
A model flow (models/<name>/<name>.py) subclasses PyNet and says in `forward` which submodel
feeds which; the layers, their input sizes and the skip connections all come from the YAML.

Everything a user can get wrong in an architecture is checked while building, before anything
trains or is written, and reported as a UserError naming the file and the key path: first
architecture.py reads the YAML into a plan (every check that needs no shapes), then
ArchitectureBuilder builds the modules from it, working out each layer's shape on the meta device
(the checks that need shapes).

Run `python model_base.py <architecture.yaml>` to check an architecture and print its summary.
"""
import argparse
import contextlib
import contextvars
import functools
import importlib.util
import inspect
import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

import layers as custom_layers
from engine.architecture import ADV_TYPES, fail_at, read_architecture
from engine.config import parse_yaml, read_yaml, resolve_path
from engine.errors import UserError, did_you_mean, dtype_name, kwargs_text, run_main, shown, user_code_error
from engine.registry import layer_types, parametrizations


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
# Layers that read a sequence [time, features] per sample; torch would take a 1-D sample as an
# unbatched sequence and mix the batch, so other shapes are refused.
SEQUENCE_LAYERS = ("RNN", "GRU", "LSTM", "MultiheadAttention", "TransformerEncoderLayer")
# Norms over the last dim that a conv map ([C, H, W]) is better normalised by giving all of it.
LAST_DIM_NORMS = ("LayerNorm", "RMSNorm")
SHAPE_BATCH = 2  # batch size of the meta tensors used to work out shapes (BatchNorm needs > 1)
# Layer arguments that the pipeline sets for the whole model: a layer built on another device or
# in another dtype would not move with the rest (a meta or float64 layer among float32 ones).
SET_BY_PIPELINE = {
    "device": "the pipeline places the whole model (training.gpus; evaluation.gpus; jit_trace_model.py --device)",
    "dtype": "the pipeline sets the whole model's precision (training.precision: fp32, bf16 or fp16); a layer of "
             "its own dtype would not match its neighbours",
}


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
    a flow overrides it to spell the wiring out. `forward` is the inference path that evaluate.py
    shows and jit_trace_model.py exports: one tensor in per data stream the architecture reads
    (`input_keys`, in the order submodels first read them), one tensor out.

    The model's inputs, wherever they are passed around (split_batch, discriminate, the scripts),
    are the tensor itself for a model of one stream, as they always were, and a tuple in
    `input_keys` order for a model of several; the functions below the class (as_tuple,
    run_model, split_inputs, ...) handle both forms.
    """

    target_key = None  # the data stream a generator's output is compared with (set in a flow)
    # Whether target i belongs to input i (image-to-image, regression), so evaluate.py compares
    # them pairwise; a GAN's real samples are not paired with its noise.
    paired_targets = False
    # Whether a discriminator that ends on a bounding layer (Sigmoid, Tanh, ...) is meant with a
    # loss that takes raw scores; train.py refuses the pair otherwise (see step.BOUNDING).
    bounded_scores = False

    def __init__(self, architecture_cfg_path):
        super().__init__()
        path = resolve_path(architecture_cfg_path)
        self.architecture_path = str(path)
        text = (_ARCHITECTURE_TEXTS.get() or {}).get(str(path))
        if text is None:
            arch = read_yaml(path, "architecture")
            text = path.read_text()
        else:
            arch = parse_yaml(text, f"{path} (as stored in the checkpoint)", "architecture")
        plan = read_architecture(path, arch)
        self.architecture_text = text
        self.model_components, self.rows = ArchitectureBuilder(plan).build()
        self.submodels = {s: sub for comp in self.model_components.values() for s, sub in comp.items()}
        self.adv_types = {c: comp.adv_type for c, comp in plan.components.items()}
        self.sources = {s: sub.sources for s, sub in plan.submodels.items()}
        # The data streams forward takes, in order: their names, per-sample shapes and dtypes. The
        # first one's are input_key and input_size (all there was when a model read one stream).
        self.input_keys = tuple(plan.data_inputs)
        self.input_sizes = {key: data.size for key, data in plan.data_inputs.items()}
        self.input_dtypes = {key: data.dtype for key, data in plan.data_inputs.items()}
        self.input_key, self.input_size = plan.input_key, plan.input_size
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

    def data_values(self, inputs):
        """{data key: tensor} of `inputs`, one tensor per input_keys entry, in that order."""
        if len(inputs) != len(self.input_keys):
            raise TypeError(f"{type(self).__name__} takes {len(self.input_keys)} input(s), one tensor per data stream "
                            f"({', '.join(self.input_keys)}), but was given {len(inputs)}")
        for key, x in zip(self.input_keys, inputs):  # (a mix-up of the order would fail far from here)
            if isinstance(x, torch.Tensor) and x.is_floating_point() != self.input_dtypes[key].is_floating_point:
                raise TypeError(f"{type(self).__name__}: the input for {key} is {dtype_name(x.dtype)}, but the "
                                f"architecture declares {key} {dtype_name(self.input_dtypes[key])}; inputs go in "
                                f"input_keys order: {', '.join(self.input_keys)}")
        return dict(zip(self.input_keys, inputs))

    def forward(self, *inputs):
        values, skip_dict = self.data_values(inputs), {}
        for name in self._generator_submodels:
            out = self.run_submodel(name, values, skip_dict)
        return out

    def discriminate(self, samples, inputs=None):
        """Discriminator scores for `samples` (real or generated). The discriminator's inputs
        from generator submodels are replaced by `samples`; data inputs come from `inputs` (the
        tensor of a model of one stream, a tuple in input_keys order of several)."""
        values, skip_dict = dict.fromkeys(self._generator_submodels, samples), {}
        if inputs is not None:
            values |= self.data_values(as_tuple(inputs))
        for name in self._discriminator_submodels:
            out = self.run_submodel(name, values, skip_dict)
        return out

    # ---- helpers for the trainer and the scripts ----
    @property
    def writes_own_step(self):
        """Whether the flow writes its own training step (a `losses` method; docs/training.md)."""
        return callable(getattr(self, "losses", None))

    @property
    def has_discriminator(self):
        return "discriminator" in self.adv_types.values()

    def last_layer(self, adv_type):
        """(submodel name, index, layer name, module) of the last layer of the last submodel of
        this kind (generator or discriminator): what its output usually comes from."""
        names = self._generator_submodels if adv_type == "generator" else self._discriminator_submodels
        layers = list(self.submodels[names[-1]].layers.items())
        return names[-1], len(layers) - 1, *layers[-1]

    def components_named(self, names):
        """The components `names` as one module, sharing their weights: what a network's optimizer
        trains and its EMA averages, and what their saved states load into (a name this model
        lacks is left out)."""
        return nn.ModuleDict({name: self.model_components[name] for name in names if name in self.model_components})

    def components_of(self, adv_type):
        """The components of one kind (generator or discriminator) as one module (components_named)."""
        return self.components_named([name for name, kind in self.adv_types.items() if kind == adv_type])

    def parameters_of(self, adv_type):
        return [p for name, comp in self.model_components.items()
                if self.adv_types[name] == adv_type for p in comp.parameters()]

    def split_batch(self, batch):
        """(generator inputs, targets) of a batch dict of data streams: the inputs are the tensor
        of the one stream the model reads, or a tuple of its streams in input_keys order."""
        inputs = tuple(batch[key] for key in self.input_keys)
        return inputs[0] if len(inputs) == 1 else inputs, batch.get(self.target_key) if self.target_key else None

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


# ---- a model's inputs: one tensor, or a tuple of them (one per input_keys entry) --------------
# What the trainer and the scripts use instead of assuming one tensor; each keeps the form it is
# given, so a model of one stream sees exactly what it always saw.
def as_tuple(inputs):
    """The inputs as a tuple of tensors (a model of one stream's tensor: a tuple of one)."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def map_inputs(fn, inputs):
    """fn applied to every tensor of `inputs`, in the same form (a tensor, or a tuple)."""
    return tuple(fn(x) for x in inputs) if isinstance(inputs, (tuple, list)) else fn(inputs)


def run_model(model, inputs):
    """model(*inputs): the forward pass on inputs of either form."""
    return model(*as_tuple(inputs))


def batch_size_of(inputs):
    """How many samples the inputs hold (every input holds as many)."""
    return len(as_tuple(inputs)[0])


def inputs_to(inputs, device, **kwargs):
    """The inputs moved by Tensor.to(device, **kwargs) (e.g. non_blocking=True)."""
    return map_inputs(lambda x: x.to(device, **kwargs), inputs)


def index_inputs(inputs, index):
    """The samples `index` (an int, slice or index tensor) of every input."""
    return map_inputs(lambda x: x[index], inputs)


def split_inputs(inputs, size):
    """Tensor.split(size) over the batch of every input: a list of inputs of `size` samples each
    (the last may hold fewer), each in the form of `inputs`."""
    if not isinstance(inputs, (tuple, list)):
        return list(inputs.split(size))
    return list(zip(*(x.split(size) for x in inputs)))


def takes_indices(cls):
    """Whether a layer class reads integer indices: an Embedding or EmbeddingBag (or a subclass),
    or a class of layers.py that says so with `takes_indices = True`."""
    return issubclass(cls, (nn.Embedding, nn.EmbeddingBag)) or getattr(cls, "takes_indices", False) is True


def ref(source, kind):
    """How ArchitectureBuilder keys what a submodel reads: a data stream apart from a layer or
    submodel that has its name."""
    return ("data", source) if kind == "data" else source


class ArchitectureBuilder:
    """Builds the Submodels of an ArchitecturePlan (architecture.py), working out every layer's
    per-sample output shape and dtype as it goes, and checking what needs them: the input sizes
    a layer is given, the inputs it can take (integer indices or float values), and the merges
    of skips and of a submodel's inputs."""

    def __init__(self, plan):
        self.plan = plan
        self.shapes = {}  # name (submodel, layer, <prefix>_input) -> per-sample shape
        self.dtypes = {}  # name -> dtype of its output
        # name -> the data streams an integer output holds the values of (what a message names)
        self.streams = {}
        for key, data in plan.data_inputs.items():  # (keyed apart from layer names, which may be alike)
            self.shapes["data", key], self.dtypes["data", key] = data.size, data.dtype
            self.streams["data", key] = [key]

    def fail(self, key_path, message):
        raise UserError(f"{self.plan.path}: {key_path}: {message}")

    def build(self):
        """(model_components: {component: {submodel: Submodel}}, summary rows)."""
        built, rows = {}, []
        for sub in self.plan.submodels.values():
            self.read_input(sub)
            reads = [source if self.dtypes[ref(source, kind)].is_floating_point else
                     f"{source} ({dtype_name(self.dtypes[ref(source, kind)])})" for source, kind in sub.inputs]
            rows.append({"name": sub.input_name, "type": "input", "shape": self.shapes[sub.input_name],
                         "params": 0, "merges": ", ".join(reads)})
            built[sub.name] = self.build_submodel(sub, rows)
        model_components = nn.ModuleDict({cname: nn.ModuleDict({s: built[s] for s in comp.submodels})
                                          for cname, comp in self.plan.components.items()})
        return model_components, rows

    def read_input(self, sub):
        """The shape and dtype of what the submodel reads: its inputs concatenated on the channel dim."""
        refs = [ref(source, kind) for source, kind in sub.inputs]
        shapes = [self.shapes[r] for r in refs]
        first, name = shapes[0], sub.input_name
        if len(shapes) > 1:
            kinds = {self.dtypes[r].is_floating_point for r in refs}
            if len(kinds) > 1:
                ints = [source for source, r in zip(sub.sources, refs) if not self.dtypes[r].is_floating_point]
                self.fail(sub.input_where, f"reads integer ({', '.join(ints)}) and float inputs, which cannot be "
                          "concatenated; embed the integers in a submodel of their own (an Embedding) and read its "
                          "output here")
            for shape in shapes:
                if not shape or len(shape) != len(first) or shape[1:] != first[1:]:
                    self.fail(sub.input_where, f"inputs of shapes {[list(s) for s in shapes]} cannot be "
                              "concatenated on the channel dimension; all but the channel count must match")
        self.shapes[name] = (sum(s[0] for s in shapes),) + tuple(first[1:]) if len(shapes) > 1 else first
        self.dtypes[name] = self.dtypes[refs[0]]
        self.streams[name] = [k for r in refs for k in self.streams[r]]

    def build_submodel(self, sub, rows):
        """The Submodel of `sub`; a summary row per layer goes to `rows`."""
        previous, built = sub.input_name, {}
        for i, (layer_plan, name) in enumerate(zip(sub.layers, sub.layer_names)):
            where, type_name = sub.layer_where(i), layer_plan.type_name
            layer = self.make_layer(type_name, layer_plan.params, self.shapes[previous], where)
            self.check_input_dtype(layer, type_name, previous, where)
            layer = parametrize(layer, layer_plan.parametrization, type_name, where, self.plan.path)
            shape, self.dtypes[name] = self.output_of(layer, previous, where, type_name)
            self.streams[name] = [] if self.dtypes[name].is_floating_point else self.streams[previous]
            notes = []
            for source, kind in self.plan.merges.get(name, ()):
                shape = self.merge_shape(shape, self.shapes[source], kind, self.plan.merge_where[(source, name)], name)
                notes.append(f"{kind} {source}")
            self.shapes[name] = shape
            built[name], previous = layer, name
            shown_type = type_name + (f"+{layer_plan.parametrization[0]}" if layer_plan.parametrization else "")
            rows.append({"name": name, "type": shown_type, "shape": shape, "merges": ", ".join(notes),
                         "params": sum(p.numel() for p in layer.parameters())})
        self.shapes[sub.name], self.dtypes[sub.name], self.streams[sub.name] = \
            self.shapes[previous], self.dtypes[previous], self.streams[previous]
        return Submodel(sub.name, sub.input_name, built, self.plan.merges, self.plan.kept)

    def check_input_dtype(self, layer, type_name, previous, where):
        """Indices into a layer that reads them, values into one that computes with its weights:
        torch would fail at the first batch, or (on the meta device) not at all."""
        dtype, streams = self.dtypes[previous], " and ".join(self.streams[previous])
        if takes_indices(type(layer)):
            if dtype.is_floating_point:
                self.fail(where, f"{type_name} reads integer indices, but its input is {dtype_name(dtype)}; give the "
                          "stream it reads dtype: int64 (input_data: {data_key: ..., input_size: [...], dtype: int64})")
            return
        weights = [t for t in [*layer.parameters(), *layer.buffers()] if t.is_floating_point()]
        if not dtype.is_floating_point and weights:
            what = f"{streams} is an {dtype_name(dtype)} stream" if streams else f"its input is {dtype_name(dtype)}"
            self.fail(where, f"{type_name} reads float inputs, but {what}; put an Embedding first (or declare the "
                      "stream float32, if its values are numbers rather than indices)")

    def make_layer(self, type_name, params, shape, where):
        """The layer, its input-size arguments filled in from `shape` (the previous output's)."""
        for name in SET_BY_PIPELINE:
            if name in params:
                self.fail(f"{where}.layer_params.{name}", f"{SET_BY_PIPELINE[name]}; leave {name} out")
        cls = layer_types()[type_name]
        try:
            signature = init_parameters(cls)
        except (TypeError, ValueError) as e:  # (a class whose constructor inspect cannot read)
            self.fail(f"{where}.layer_type", f"{type_name}'s constructor cannot be read: {e}")
        rules = input_size_rules(type_name, cls, signature) if shape else {}  # (one index a sample: no sizes)
        check_input_rank(type_name, cls, params, shape, where, self.plan.path)
        if not any(p.kind is p.VAR_KEYWORD for p in signature.values()):
            for name in params:
                if name not in signature:
                    valid = [n for n in signature if n != "self" and n not in rules]
                    self.fail(f"{where}.layer_params.{name}", f"{type_name} takes no argument {shown(name)}"
                              f"{did_you_mean(name, valid)}; valid: {', '.join(valid)}")
        kwargs = layer_kwargs(params, rules, shape, where, self.plan.path)
        missing = [n for n, p in signature.items() if n != "self" and p.default is p.empty
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs]
        if missing:
            self.fail(f"{where}.layer_params", f"{type_name} needs {', '.join(missing)}")
        try:
            return cls(**kwargs)
        except Exception as e:  # the layer's own check of its arguments
            self.fail(f"{where}.layer_params", f"{type_name}({kwargs_text(kwargs)}) failed: {e}")

    def output_of(self, layer, previous, where, type_name):
        """The layer's per-sample output shape and its dtype, worked out on the meta device (no real
        data) from the output of `previous` (an integer input for integer streams)."""
        shape, dtype = self.shapes[previous], self.dtypes[previous]
        state = {k: v.to("meta") for k, v in [*layer.named_parameters(), *layer.named_buffers()]}
        try:
            y = functional_call(layer, state, (torch.empty((SHAPE_BATCH, *shape), dtype=dtype, device="meta"),))
        except Exception as e:
            of = "" if dtype.is_floating_point else f" of {dtype_name(dtype)} values"
            self.fail(where, f"{type_name} cannot take an input{of} of shape {list(shape)} (per sample): {e}")
        if not isinstance(y, torch.Tensor):
            self.fail(where, f"{type_name} returns a {type(y).__name__}, not a tensor; wrap it in a layer in "
                      "layers.py that returns one tensor")
        return tuple(y.shape[1:]), y.dtype

    def merge_shape(self, shape, source_shape, kind, where, target):
        if kind == "add":
            if shape != source_shape:
                self.fail(where, f"add into {target}: shapes {list(source_shape)} and {list(shape)} differ")
            return shape
        if len(shape) != len(source_shape) or shape[1:] != source_shape[1:]:
            self.fail(where, f"cat into {target}: shapes {list(source_shape)} and {list(shape)} differ beyond "
                      "the channel dimension")
        return (shape[0] + source_shape[0],) + shape[1:]


@functools.cache
def init_parameters(cls):
    """The parameters of a layer class's constructor (read once per class)."""
    return inspect.signature(cls.__init__).parameters


def parametrize(layer, spec, type_name, where, path):
    """The layer with its `parametrization` (name, arguments) applied by its function in
    torch.nn.utils.parametrizations: the layer then computes that weight from parameters of its
    own at every pass."""
    if spec is None:
        return layer
    name, args = spec
    target = args.get("name", "weight")
    own = dict(layer.named_parameters(recurse=False))
    if not isinstance(target, str) or target not in own:
        has = f"its own parameters are {', '.join(own)}" if own else "it has no parameters of its own"
        fail_at(path, f"{where}.parametrization", f"{name} reparametrizes a layer's {shown(target)}, but {type_name} "
                  f"has no parameter {shown(target)} ({has}); parametrize a layer with weights (Conv2d, Linear, "
                  "...)")
    try:
        return parametrizations()[name](layer, **args)
    except Exception as e:  # the parametrization's own check of its arguments and of the weight
        fail_at(path, f"{where}.parametrization", f"{name}({kwargs_text(args)}) failed on {type_name}: {e}")


def layer_kwargs(params, rules, shape, where, path):
    """`params` with the input-size arguments that `rules` read off `shape`; one the YAML gives
    must agree with the input."""
    kwargs = dict(params)
    for name, rule in rules.items():
        inferred = rule(shape)
        if name not in kwargs:
            kwargs[name] = inferred
        elif isinstance(kwargs[name], int) and kwargs[name] != inferred:
            fail_at(path, f"{where}.layer_params.{name}", f"{kwargs[name]}, but the input (per-sample shape "
                      f"{list(shape)}) gives {inferred}; leave {name} out to have it filled in")
    return kwargs


def check_input_rank(type_name, cls, params, shape, where, path):
    """Inputs that torch would accept but read in a way nobody means."""
    if not shape and issubclass(cls, nn.EmbeddingBag):
        fail_at(path, where, f"{type_name} reads a bag of indices, [bag size] per sample, but gets one index a sample; "
                  "use Embedding")
    if not shape and not takes_indices(cls):
        fail_at(path, where, f"{type_name} gets a scalar per sample; give it at least one dimension (input_size [1] "
                  "for a stream of one value a sample; Unflatten after a layer)")
    if type_name in SEQUENCE_LAYERS and len(shape) != 2:
        hint = ("; with one dimension, torch would take the whole batch as one sequence "
                "(Unflatten it to [time, features])") if len(shape) == 1 else ""
        fail_at(path, where, f"{type_name} reads a sequence [time, features] per sample, but its input has per-sample "
                  f"shape {list(shape)}{hint}")
    if type_name in LAST_DIM_NORMS and len(shape) >= 3 and "normalized_shape" not in params:
        fail_at(path, f"{where}.layer_params", f"{type_name} would normalise only the last dim of {list(shape)}; give "
                  f"normalized_shape (e.g. {list(shape)} for all of it), or use GroupNorm with num_groups: 1")


def input_size_rules(type_name, cls, signature):
    """{constructor argument: how to read it off the input shape} for the layer class `cls`."""
    if type_name in INPUT_SIZE:  # by signature too: a layers.py class may reuse a torch.nn name
        return {name: rule for name, rule in INPUT_SIZE[type_name].items() if name in signature}
    if cls.__module__ == custom_layers.__name__:
        return {name: rule for name, rule in CUSTOM_INPUT_SIZE.items() if name in signature}
    return {}


_ARCHITECTURE_TEXTS = contextvars.ContextVar("architecture_texts", default=None)  # {path: text} or None


@contextlib.contextmanager
def architecture_text_for(path, text):
    """Within this block, a PyNet of the architecture at `path` is built from `text` instead of
    the file: how a checkpoint is rebuilt with the architecture it was trained with."""
    token = _ARCHITECTURE_TEXTS.set({**(_ARCHITECTURE_TEXTS.get() or {}), str(resolve_path(path)): text})
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
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        sys.modules.pop(name, None)
        raise UserError(f"{path}{f', line {e.lineno}' if e.lineno else ''}: not valid Python: {e.msg}") from None
    except (ValueError, UnicodeDecodeError) as e:  # (null bytes, bytes that are not text)
        sys.modules.pop(name, None)
        raise UserError(f"{path}: not a Python source file: {e}") from None
    except Exception as e:  # the module's own code failed (an import it needs, say)
        sys.modules.pop(name, None)
        raise user_code_error(e, f"importing {path}") from None
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
    example = "example:\n  python model_base.py models/unet_gan/unet_gan_architecture.yaml"
    parser = argparse.ArgumentParser(description="Check an architecture YAML and print its per-layer summary.",
                                     epilog=example, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("architecture", help="an architecture YAML file")
    parser.add_argument("--debug", action="store_true", help="show a full traceback for errors")
    args = parser.parse_args(argv)
    print(PyNet(Path(args.architecture).resolve()).summary())  # a command-line path is relative to here


if __name__ == "__main__":
    run_main(main)
