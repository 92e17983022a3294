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
from architecture import ADV_TYPES, read_architecture
from config import parse_yaml, read_yaml, resolve_path
from errors import UserError, did_you_mean, kwargs_text, run_main, shown, user_code_error
from registry import layer_types


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
    a flow overrides it to spell the wiring out. `forward` is the inference path (one tensor in,
    one out) that evaluate.py shows and jit_trace_model.py traces.
    """

    target_key = None  # the data stream a generator's output is compared with (set in a flow)
    # Whether target i belongs to input i (image-to-image, regression), so evaluate.py compares
    # them pairwise; a GAN's real samples are not paired with its noise.
    paired_targets = False
    # Whether a discriminator that ends on a bounding layer (Sigmoid, Tanh, ...) is meant with a
    # loss that takes raw scores; train.py refuses the pair otherwise (see train_base.BOUNDING).
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

    def last_layer(self, adv_type):
        """(submodel name, index, layer name, module) of the last layer of the last submodel of
        this kind (generator or discriminator): what its output usually comes from."""
        names = self._generator_submodels if adv_type == "generator" else self._discriminator_submodels
        layers = list(self.submodels[names[-1]].layers.items())
        return names[-1], len(layers) - 1, *layers[-1]

    def components_of(self, adv_type):
        """The components of one kind (generator or discriminator) as one module, sharing their
        weights: what an EMA of the generator averages, and what its saved weights load into."""
        return nn.ModuleDict({name: comp for name, comp in self.model_components.items()
                              if self.adv_types[name] == adv_type})

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
    """Builds the Submodels of an ArchitecturePlan (architecture.py), working out every layer's
    per-sample output shape as it goes, and checking what needs shapes: the input sizes a layer
    is given, the inputs it can take, and the merges of skips and of a submodel's inputs."""

    def __init__(self, plan):
        self.plan = plan
        self.shapes = {}  # name (submodel, layer, <prefix>_input) -> per-sample shape

    def fail(self, key_path, message):
        raise UserError(f"{self.plan.path}: {key_path}: {message}")

    def build(self):
        """(model_components: {component: {submodel: Submodel}}, summary rows)."""
        built, rows = {}, []
        for sub in self.plan.submodels.values():
            self.shapes[sub.input_name] = self.input_shape(sub)
            rows.append({"name": sub.input_name, "type": "input", "shape": self.shapes[sub.input_name],
                         "params": 0, "merges": ", ".join(sub.sources)})
            built[sub.name] = self.build_submodel(sub, rows)
        model_components = nn.ModuleDict({cname: nn.ModuleDict({s: built[s] for s in comp.submodels})
                                          for cname, comp in self.plan.components.items()})
        return model_components, rows

    def input_shape(self, sub):
        """The shape of what the submodel reads: its inputs concatenated on the channel dim."""
        shapes = [self.plan.input_size if kind == "data" else self.shapes[source] for source, kind in sub.inputs]
        first = shapes[0]
        for shape in shapes[1:]:
            if len(shape) != len(first) or shape[1:] != first[1:]:
                self.fail(sub.input_where, f"inputs of shapes {[list(s) for s in shapes]} cannot be concatenated on "
                          "the channel dimension; all but the channel count must match")
        return (sum(s[0] for s in shapes),) + tuple(first[1:])

    def build_submodel(self, sub, rows):
        """The Submodel of `sub`; a summary row per layer goes to `rows`."""
        shape, built = self.shapes[sub.input_name], {}
        for i, ((type_name, params), name) in enumerate(zip(sub.layers, sub.layer_names)):
            where = sub.layer_where(i)
            layer = self.make_layer(type_name, params, shape, where)
            shape = self.output_shape(layer, shape, where, type_name)
            notes = []
            for source, kind in self.plan.merges.get(name, ()):
                shape = self.merge_shape(shape, self.shapes[source], kind, self.plan.merge_where[(source, name)], name)
                notes.append(f"{kind} {source}")
            self.shapes[name] = shape
            built[name] = layer
            rows.append({"name": name, "type": type_name, "shape": shape, "merges": ", ".join(notes),
                         "params": sum(p.numel() for p in layer.parameters())})
        self.shapes[sub.name] = shape
        return Submodel(sub.name, sub.input_name, built, self.plan.merges, self.plan.kept)

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
        rules = input_size_rules(type_name, cls, signature)
        self.check_input_rank(type_name, params, shape, where)
        if not any(p.kind is p.VAR_KEYWORD for p in signature.values()):
            for name in params:
                if name not in signature:
                    valid = [n for n in signature if n != "self" and n not in rules]
                    self.fail(f"{where}.layer_params.{name}", f"{type_name} takes no argument {shown(name)}"
                              f"{did_you_mean(name, valid)}; valid: {', '.join(valid)}")
        kwargs = self.layer_kwargs(params, rules, shape, where)
        missing = [n for n, p in signature.items() if n != "self" and p.default is p.empty
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs]
        if missing:
            self.fail(f"{where}.layer_params", f"{type_name} needs {', '.join(missing)}")
        try:
            return cls(**kwargs)
        except Exception as e:  # the layer's own check of its arguments
            self.fail(f"{where}.layer_params", f"{type_name}({kwargs_text(kwargs)}) failed: {e}")

    def layer_kwargs(self, params, rules, shape, where):
        """`params` with the input-size arguments that `rules` read off `shape`; one the YAML gives
        must agree with the input."""
        kwargs = dict(params)
        for name, rule in rules.items():
            inferred = rule(shape)
            if name not in kwargs:
                kwargs[name] = inferred
            elif isinstance(kwargs[name], int) and kwargs[name] != inferred:
                self.fail(f"{where}.layer_params.{name}", f"{kwargs[name]}, but the input (per-sample shape "
                          f"{list(shape)}) gives {inferred}; leave {name} out to have it filled in")
        return kwargs

    def check_input_rank(self, type_name, params, shape, where):
        """Inputs that torch would accept but read in a way nobody means."""
        if not shape:
            self.fail(where, f"{type_name} gets a scalar per sample; give it at least one dimension (Unflatten)")
        if type_name in SEQUENCE_LAYERS and len(shape) != 2:
            hint = ("; with one dimension, torch would take the whole batch as one sequence "
                    "(Unflatten it to [time, features])") if len(shape) == 1 else ""
            self.fail(where, f"{type_name} reads a sequence [time, features] per sample, but its input has per-sample "
                      f"shape {list(shape)}{hint}")
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


@functools.cache
def init_parameters(cls):
    """The parameters of a layer class's constructor (read once per class)."""
    return inspect.signature(cls.__init__).parameters


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
