"""Every name a user may type, in one place: the tables that map it to a class or function.

A config or an architecture names things (`optimizer: Adam`, `loss_fn: example_gan_loss`,
`layer_type: Conv2d`, `parametrization: spectral_norm`); each table below is {name: object} for
one kind of name, and `lookup` resolves a name in one, or raises a UserError that lists the valid
names with a did-you-mean.
Nothing is registered by hand: a table is read off its module (a class in layers.py, a function
in loss.py or dataset_functions.py is usable by name as soon as it is defined there).

The tables are computed once (functools.cache) and shared: treat them as read-only. The modules
they read (torch, torchvision, the repository's own) are imported when a table is first asked for.
"""
import functools
import inspect

from engine.errors import UserError, did_you_mean, shown


def lookup(name, table, what, where, valid=None):
    """Resolve a user-typed `name` in `table` (a dict), or raise a UserError that lists options.

    `what` says what kind of name it is ("loss function in loss.py"); `where` names the file and
    key path it came from ("configs/x.yaml: loss.loss_fn"); `valid` describes the valid names
    when there are too many to list.
    """
    if isinstance(name, str) and name in table:
        return table[name]
    raise UserError(f"{where}: {shown(name)}: {unknown_name(name, table, what, valid)}")


def unknown_name(name, table, what, valid=None):
    """What to say of a name missing from `table`: what it should be, a did-you-mean, the valid names."""
    return f"unknown {what}{did_you_mean(name, table)}; valid: {valid or ', '.join(sorted(table))}"


def public_functions(module):
    """The functions a user may name from `module`: defined there, not starting with '_'."""
    return {name: obj for name, obj in vars(module).items()
            if callable(obj) and not name.startswith("_") and not isinstance(obj, type)
            and getattr(obj, "__module__", None) == module.__name__}


def classes_of(module, base):
    """{name: class} of the public subclasses of `base` found in `module` (imported ones included)."""
    return {n: c for n, c in vars(module).items()
            if isinstance(c, type) and issubclass(c, base) and not n.startswith("_")}


# ---- the tables --------------------------------------------------------------------------------
@functools.cache
def layer_types():
    """Every layer type an architecture may name: torch.nn's modules, then those defined in
    layers.py (which win where a name is in both)."""
    from torch import nn

    import layers
    table = {n: c for n, c in vars(nn).items() if isinstance(c, type) and issubclass(c, nn.Module)}
    table.update({n: c for n, c in vars(layers).items() if isinstance(c, type)
                  and issubclass(c, nn.Module) and c.__module__ == layers.__name__})
    return table


# The functions of torch.nn.utils.parametrizations a layer's `parametrization` may name: each
# takes the built layer and recomputes one of its weights from parameters of its own at every pass.
PARAMETRIZATIONS = ("orthogonal", "spectral_norm", "weight_norm")


@functools.cache
def parametrizations():
    """{name: function} of the layer parametrizations an architecture may name."""
    from torch.nn.utils import parametrizations as module
    return {name: getattr(module, name) for name in PARAMETRIZATIONS}


@functools.cache
def optimizers():
    """The optimizer classes of torch.optim (training.optimizer, adversarial.optimizer)."""
    import torch
    return {n: c for n, c in classes_of(torch.optim, torch.optim.Optimizer).items() if c is not torch.optim.Optimizer}


# Schedulers that take a callable or other schedulers, which a YAML file cannot give.
NOT_CONFIGURABLE_SCHEDULERS = ("LRScheduler", "LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler")


@functools.cache
def schedulers():
    """The classes of torch.optim.lr_scheduler that a YAML file can configure (training.scheduler)."""
    from torch.optim import lr_scheduler as sched
    return {n: c for n, c in classes_of(sched, (sched.LRScheduler, sched.ReduceLROnPlateau)).items()
            if n not in NOT_CONFIGURABLE_SCHEDULERS}


@functools.cache
def loss_functions():
    """The functions of loss.py (loss.loss_fn)."""
    import loss
    return public_functions(loss)


@functools.cache
def dataset_functions():
    """The functions of dataset_functions.py: file readers, generating functions, postprocessing
    functions and batch transforms."""
    import dataset_functions as module
    return public_functions(module)


# torchvision.transforms.v2 classes that take callables or other transforms, work on PIL images,
# boxes or labels, or return tuples: none of them is one step on a batch of tensors.
NOT_BATCH_TRANSFORMS = {"Transform", "Compose", "RandomApply", "RandomChoice", "RandomOrder", "Lambda", "CutMix",
                        "MixUp", "FiveCrop", "TenCrop", "PILToTensor", "ToImage", "ToPILImage", "ToPureTensor",
                        "ToTensor", "ClampBoundingBoxes", "ClampKeyPoints", "ConvertBoundingBoxFormat",
                        "SetClampingMode", "SanitizeBoundingBoxes", "SanitizeKeyPoints", "RandomIoUCrop",
                        "UniformTemporalSubsample"}


@functools.cache
def batch_transforms():
    """What a batch transform may name: a function in dataset_functions.py (vectorised over the
    batch) or a torchvision.transforms.v2 class (applied sample by sample)."""
    import torchvision.transforms.v2 as v2
    classes = {n: c for n, c in classes_of(v2, v2.Transform).items() if n not in NOT_BATCH_TRANSFORMS}
    # dataset_functions' batch transforms are the ones whose first parameter is the batch
    functions = {n: f for n, f in dataset_functions().items()
                 if next(iter(inspect.signature(f).parameters), None) == "batch"}
    return classes | functions


# The sample metrics (sample_metrics.py), the keys each writes into metrics.jsonl and the metrics
# JSON, and the feature extractors they may compare samples with.
SAMPLE_METRICS = ("fid", "kid", "precision_recall")
RESULT_KEYS = {"fid": ("fid",), "kid": ("kid_mean", "kid_std"), "precision_recall": ("precision", "recall")}
EXTRACTORS = ("inception", "pixels", "checkpoint:<path>")


def result_keys(metrics):
    return [key for metric in metrics for key in RESULT_KEYS[metric]]
