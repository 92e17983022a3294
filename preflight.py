"""Check that one training step can run, before a run writes anything.

Data that does not fit the model (real images of another size than the discriminator was built
for, a stream with the wrong number of channels, targets a loss cannot compare with the outputs)
would otherwise be found at step 1, after the run folder and an epoch-0 checkpoint are written,
as a bare torch error ("expected input[1, 64, 8, 8] to have 1 channels") that names no stream,
submodel or config key. cli.check_batches_fit_model checks only the generator's input stream
against the architecture's input_size; the real samples, the flow's wiring and the loss are
first used by the step itself.

So `check_step` runs the forward passes and loss terms of one step on a first batch, phase by
phase, and turns a failure into a UserError that says what was fed where. It leaves no trace:
the random number generators, the model's buffers (BatchNorm statistics) and its train/eval
modes are restored, so a run with the check trains bit for bit as one without it.
"""
import contextlib
import functools
import random
import sys

import numpy as np
import torch

from errors import UserError, user_frames
from model_base import CUSTOM_INPUT_SIZE, INPUT_SIZE

SAMPLES = 2  # enough for a BatchNorm in train mode, few enough to cost nothing


def check_step(losses, batch, where):
    """Run one training step's forward passes and loss terms (no backward, no optimizer step)
    with `losses` (a train_base.Losses) on the first samples of `batch` ({stream: tensor}, as
    the training loader makes them). A failure is a UserError starting with `where` (the
    training config's path) that names the phase, the data stream and its per-sample shape, the
    submodel and layer that failed with the shape it was given and the one it expects, and
    torch's own message. Returns what the step made: the outputs' per-sample shape and each
    network's loss term names, {"outputs": [..], "terms": {network: [term, ...]}}."""
    model = losses.model
    inputs, targets = losses.to_device({name: x[:SAMPLES] for name, x in batch.items()})
    flow = type(model).__name__
    fed_inputs = (f"dataset stream '{model.input_key}' (the generator's inputs, input_data.data_key of "
                  f"{model.architecture_path}), {samples(inputs)}")
    layers = LayerTrace(model)
    saved = saved_state(model)
    try:
        # As training runs: under autograd (a gradient penalty needs it) and in train mode (so that
        # a BatchNorm on a batch of one fails here as in step 1).
        with torch.random.fork_rng(cuda_devices(model)), torch.enable_grad(), eagerly():
            model.train()
            outputs = run_phase(layers, where, "the generator's forward pass", fed_inputs,
                                lambda: losses.forward(inputs))
            networks = ["generator"]
            if losses.adversarial:
                networks.append("discriminator")
                fed_real = (f"dataset stream '{model.target_key}' (the discriminator's real samples, target_key of "
                            f"the flow {flow}), {samples(targets)}")
                fed_fake = f"the generator's outputs (from dataset stream '{model.input_key}'), {samples(outputs)}"
                with losses.autocast():
                    run_phase(layers, where, "the discriminator on the real samples", fed_real,
                              lambda: model.discriminate(targets, inputs))
                    run_phase(layers, where, "the discriminator on the generated samples", fed_fake,
                              lambda: model.discriminate(outputs, inputs))
            fed_loss = f"loss.loss_fn {losses.fn.__name__}, given outputs: {samples(outputs)}; targets: "
            fed_loss += (f"dataset stream '{model.target_key}', {samples(targets)}" if targets is not None
                         else "none (the flow sets no target_key)")
            terms = {}
            for net in networks:  # the terms exactly as training computes them
                _, terms[net] = run_phase(layers, where, f"the {net}'s loss terms", fed_loss,
                                          lambda net=net: losses(net, inputs, targets, outputs), in_network=False)
    finally:
        layers.remove()
        restore_state(model, saved)
    for net, found in terms.items():
        for term, value in found.items():
            if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
                shown = f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
                raise UserError(f"{where}: loss.loss_fn {losses.fn.__name__} with loss.loss_args {losses.args} gives "
                                f"the {net} a term {term!r} that is {shown}; each term must be one number (a 0-d "
                                "float tensor): check loss.loss_args (a weight written as a list?)")
    return {"outputs": list(outputs.shape[1:]), "terms": {net: ["total", *found] for net, found in terms.items()}}


def run_phase(layers, where, phase, fed, step, in_network=True):
    """`step()`; if it fails, a UserError naming the phase, what it was fed (`fed`), the layer
    that failed, and torch's message."""
    layers.entered.clear()
    try:
        return step()
    except UserError:
        raise
    # Whatever else: torch's errors for data that does not fit (shapes, dtypes, arguments), and what
    # a flow, layer or loss of the user's raises (a KeyError for a submodel the architecture no
    # longer has, say).
    except Exception as e:
        if isinstance(e, torch.OutOfMemoryError):  # not a mistake in the data: show it as it is
            raise
        lines = [f"{where}: one training step cannot run on this data: {phase} failed", f"  data: {fed}"]
        if layers.entered:
            lines.append(f"  layer: {layers.describe(*layers.entered[-1])}")
        elif in_network:
            lines.append(f"  layer: none; it failed between layers, in the flow {type(layers.model).__name__} "
                         "(e.g. where a submodel's inputs are joined on dim 1)")
        lines.append(f"  {'torch' if isinstance(e, RuntimeError) else type(e).__name__}: {str(e).strip()}")
        frames = user_frames(e)
        if frames:  # where in the user's flow, layers or loss it happened
            lines.append(f"  in your code:{frames.replace(chr(10), chr(10) + '  ')}")
        raise UserError("\n".join(lines)) from e


def samples(x):
    return f"samples of shape {list(x.shape[1:])} ({str(x.dtype).removeprefix('torch.')})"


class LayerTrace:
    """Hooks on every layer of every submodel that keep `entered`, the layers a forward pass is
    inside: a layer is pushed when it starts and popped when it returns, so after a failure the
    last entry is the layer that failed (a layer that raises never pops)."""

    def __init__(self, model):
        self.model, self.entered, self.handles = model, [], []
        for component, submodels in model.model_components.items():
            for submodel, sub in submodels.items():
                for name, layer in sub.layers.items():
                    enter = functools.partial(self.enter, (component, submodel, name))
                    self.handles.append(layer.register_forward_pre_hook(enter))
                    self.handles.append(layer.register_forward_hook(self.leave))

    def enter(self, where, layer, args):
        self.entered.append((*where, layer, args))

    def leave(self, layer, args, output):
        self.entered.pop()

    def describe(self, component, submodel, name, layer, args):
        """'component c, submodel s, layer l (Conv2d), given samples of shape [..]; it expects ...'."""
        text = f"component {component}, submodel {submodel}, layer {name} ({type(layer).__name__})"
        if args and torch.is_tensor(args[0]):
            text += f", given samples of shape {list(args[0].shape[1:])}"
        expected = expects(layer)
        if expected:
            text += f"; it expects {', '.join(expected)}"
        built = built_for(self.model).get(name)
        if built is not None:
            text += f"; the architecture built it for samples of shape {list(built)}"
        return text

    def remove(self):
        for handle in self.handles:
            handle.remove()


def expects(layer):
    """The input sizes the layer keeps ('in_channels=1', 'in_features=128', ...): the constructor
    arguments that model_base fills in from the input's shape, where the module stores them."""
    found = []
    for arg in INPUT_SIZE.get(type(layer).__name__, CUSTOM_INPUT_SIZE):
        value = getattr(layer, arg, None)
        if isinstance(value, int):
            found.append(f"{arg}={value}")
        elif isinstance(value, tuple):  # LayerNorm's normalized_shape
            found.append(f"{arg}={list(value)}")
    return found


def built_for(model):
    """{layer name: the per-sample input shape the architecture built it for}, read off the
    summary rows (a submodel's input row, then one row per layer, each with its output shape)."""
    shapes, previous = {}, None
    for row in model.rows:
        if row["type"] != "input":
            shapes[row["name"]] = previous
        previous = row["shape"]
    return shapes


def eagerly():
    """Compiled submodels (training.compile) run eagerly in the check: compiled code would hide the
    layers from the hooks, and would be compiled twice. Nothing is compiled unless torch._dynamo
    is loaded, and loading it takes a second, so a run that compiles nothing does not."""
    if "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def cuda_devices(model):
    return sorted({t.device.index for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"})


def saved_state(model):
    """What a forward pass in train mode changes: the buffers (BatchNorm running statistics and
    num_batches_tracked, spectral norm's vectors), the modules' modes, and the python and numpy
    random number generators (torch's are forked)."""
    return ({name: b.clone() for name, b in model.named_buffers()}, {m: m.training for m in model.modules()},
            random.getstate(), np.random.get_state())


def restore_state(model, saved):
    buffers, modes, python_rng, numpy_rng = saved
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    for module, training in modes.items():
        module.training = training
    random.setstate(python_rng)
    np.random.set_state(numpy_rng)
