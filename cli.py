"""What the four entry points share: command-line options and loading a trained run."""
import argparse
import sys

import torch

from checkpoint import load_checkpoint, resolve_checkpoint
from config import checkpoint_dir, load_training_config, resolve_path
from errors import UserError, did_you_mean
from model_base import architecture_text_for, build_model

SET_HELP = ("override a config key without editing the file, e.g. --set training.n_epochs=3 "
            "(the value is read as YAML; repeat --set for several keys)")


def make_parser(description, example):
    parser = argparse.ArgumentParser(description=description, epilog=f"example:\n  {example}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show a full traceback for errors in configs and files")
    return parser


def add_training_cfg(parser):
    parser.add_argument("-t", "--training_cfg", required=True, metavar="YAML",
                        help="the run's training config, e.g. configs/example_model/example_training_cfg.yaml")
    add_overrides(parser)


def add_overrides(parser):
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help=SET_HELP)


def split_overrides(overrides, section):
    """(the --set items for `section.*` of a script's own config, the rest: the training config's)."""
    own = [item for item in overrides if item.startswith(f"{section}.")]
    return own, [item for item in overrides if item not in own]


def load_trained_run(training_cfg_path, checkpoint_spec, where, overrides=(), use_ema=True):
    """(config, model with the checkpoint's weights, checkpoint path, checkpoint dict). The model
    is built from the architecture stored in the checkpoint, which is what its weights fit. With
    `use_ema`, a checkpoint's moving average of the generator's weights (training.ema_decay)
    replaces the generator's own."""
    cfg = load_training_config(training_cfg_path, overrides)
    path = resolve_checkpoint(checkpoint_spec, checkpoint_dir(cfg), where)
    state = load_checkpoint(path)
    torch.manual_seed(cfg["training"]["seed"])
    saved = state.get("architecture") if isinstance(state, dict) else None
    on_disk = resolve_path(cfg["model"]["architecture_cfg_path"])
    if saved is None:
        model = build_model(cfg["model"])
    else:
        if on_disk.read_text() != saved:
            print(f"note: {on_disk} has changed since {path.name} was trained; using the architecture stored in "
                  "the checkpoint", file=sys.stderr)
        with architecture_text_for(on_disk, saved):
            model = build_model(cfg["model"])
    load_weights(model, state, path)
    if use_ema and state.get("ema_state_dict"):
        model.components_of("generator").load_state_dict(state["ema_state_dict"])
        print(f"using the moving average of the generator's weights in {path.name} (training.ema_decay)",
              file=sys.stderr)
    return cfg, model, path, state


def targets_are_paired(model, adversarial):
    """Whether target i belongs to input i (a denoiser's clean image, a label), rather than being
    just some real sample for a discriminator."""
    return model.target_key is not None and (model.paired_targets or not adversarial)


def check_data_fits_model(streams, model, adversarial, source):
    """The streams the model reads exist, and paired inputs and targets are equally many."""
    for key, role in ((model.input_key, "input_data.data_key"), (model.target_key, "target_key")):
        if key is not None and key not in streams:
            raise UserError(f"{source}: dataset: no stream {key!r}{did_you_mean(key, streams)}, which the model reads "
                            f"({role} in {model.architecture_path if role.startswith('input') else 'its flow'}); "
                            f"streams: {', '.join(streams)}")
    if targets_are_paired(model, adversarial):
        n_in, n_target = len(streams[model.input_key]), len(streams[model.target_key])
        if n_in != n_target:
            raise UserError(f"{source}: dataset: {model.input_key} has {n_in} samples but {model.target_key} has "
                            f"{n_target}; they are paired by index (target i belongs to input i), so they must be "
                            f"equally many: check their files, or set n_inputs")


def check_batches_fit_model(datasets, model, source):
    """A first batch of each dataset ({split: dataset}), through its batch transforms, holds
    inputs of the shape the architecture expects (a crop changes it), and every split's batches
    hold what the first split's do: validation skips the training-only transforms, which must
    not be the ones that make the data fit the model (a crop, a conversion to float)."""
    first = None
    for split, data in datasets.items():
        if data is None:
            continue
        batch = data.__getitems__(((0,), torch.arange(min(2, len(data)))))
        shape = tuple(batch[model.input_key].shape[1:])
        if shape != model.input_size:
            read = tuple(data.streams[model.input_key].shape[1:])
            how = "" if read == shape else f" after its batch transforms (read: {list(read)})"
            raise UserError(f"{source}: dataset.{model.input_key}: {split} samples have shape {list(shape)}{how}, but "
                            f"the architecture {model.architecture_path} expects input_size {list(model.input_size)}")
        kinds = {name: (x.dtype, tuple(x.shape[1:])) for name, x in batch.items()}
        if first is None:
            first = split, kinds
            continue
        for name, kind in kinds.items():
            if kind != first[1][name]:
                raise UserError(
                    f"{source}: dataset.{name}: {split} samples are {kind[0]} of shape {list(kind[1])}, {first[0]} "
                    f"samples {first[1][name][0]} of shape {list(first[1][name][1])}; {split} batches get only the "
                    "batch_transforms entries with in_evaluation: true (not the streams' own data_batch_transform), "
                    "so mark the ones the model needs")


def load_weights(model, state, path):
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise UserError(f"{path}: not a checkpoint of this pipeline (no model_state_dict)")
    saved, own = state["model_state_dict"], model.state_dict()
    problems = weight_mismatches(saved, own)
    if problems:
        lines = "\n  ".join(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
        raise UserError(f"{path}: its weights do not fit the architecture {model.architecture_path} (the checkpoint "
                        f"holds the architecture it was trained with, under 'architecture'):\n  {lines}")
    model.load_state_dict(saved)


def weight_mismatches(saved, own):
    """What differs between a checkpoint's state_dict and the model's, by YAML layer name."""
    def layer(key):  # model_components.<component>.<submodel>.layers.<layer name>.<tensor>
        return key.split(".layers.", 1)[-1]

    problems = [f"{layer(k)}: {list(saved[k].shape)} in the checkpoint, {list(v.shape)} in the architecture"
                for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    problems += [f"{layer(k)}: in the architecture, not in the checkpoint" for k in own if k not in saved]
    problems += [f"{layer(k)}: in the checkpoint, not in the architecture" for k in saved if k not in own]
    return problems
