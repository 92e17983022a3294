"""What the four entry points share: command-line options, the device, and checks that the
data fits the model. (Loading a trained run: runs.py.)

This module imports torch only inside the functions that need it, so that a script can parse its
command line with it, and answer --help, before importing torch (which takes seconds)."""
import argparse
import sys

from engine.errors import UserError, did_you_mean, dtype_name, shown

SET_HELP = ("override a config key without editing the file, e.g. --set training.n_epochs=3 "
            "(the value is read as YAML; repeat --set for several keys)")


def make_parser(description, example):
    parser = argparse.ArgumentParser(description=description, epilog=f"example:\n  {example}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show a full traceback for errors in configs and files")
    return parser


def answer_early(module_name, parse_args):
    """Run as a script (`module_name` "__main__"): parse the command line now, so that --help and
    argument errors answer at once, before the script's other imports load torch. main() parses
    it again; that costs nothing."""
    if module_name == "__main__":
        parse_args(sys.argv[1:])


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


def resolve_gpus(gpus, processes=1):
    """A gpus setting as GPU ids: `auto` is one GPU per process of this machine (`processes`),
    or none (the CPU) on a machine without GPUs; a list is itself."""
    import torch

    if gpus != "auto":
        return gpus
    return list(range(processes)) if torch.cuda.is_available() and torch.cuda.device_count() else []


def select_device(gpus, where, index=0):
    """torch.device for `gpus[index]` (the CPU if `gpus` is empty), checked against this machine."""
    import torch

    gpus = resolve_gpus(gpus)

    if not gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{where}: {gpus} asks for GPUs, but this machine has none; use [] for the CPU")
    if max(gpus) >= torch.cuda.device_count():
        raise UserError(f"{where}: {gpus} names a GPU this machine lacks; "
                        f"valid ids: 0..{torch.cuda.device_count() - 1}")
    return torch.device("cuda", gpus[index])


def targets_are_paired(model, adversarial):
    """Whether target i belongs to input i (a denoiser's clean image, a label), rather than being
    just some real sample for a discriminator: in adversarial training (`adversarial`) and under
    a flow's own step, only where the flow says so (paired_targets)."""
    return model.target_key is not None and (model.paired_targets or not (adversarial or model.writes_own_step))


def check_data_fits_model(streams, model, adversarial, source):
    """The streams the model reads exist, and paired inputs and targets are equally many."""
    roles = [(key, "input_data.data_key") for key in model.input_keys] + [(model.target_key, "target_key")]
    for key, role in roles:
        if key is not None and key not in streams:
            raise UserError(f"{source}: dataset: no stream {shown(key)}{did_you_mean(key, streams)}, which the model "
                            f"reads ({role} in {model.architecture_path if role.startswith('input') else 'its flow'}); "
                            f"streams: {', '.join(streams)}")
    if targets_are_paired(model, adversarial):
        n_target = len(streams[model.target_key])
        for key in model.input_keys:
            if len(streams[key]) != n_target:
                raise UserError(f"{source}: dataset: {key} has {len(streams[key])} samples but {model.target_key} "
                                f"has {n_target}; they are paired by index (target i belongs to input i), so they "
                                "must be equally many: check their files, or set n_inputs")


def check_batches_fit_model(datasets, model, source):
    """A first batch of each dataset ({split: dataset}), through its batch transforms, holds
    inputs of the shape the architecture expects (a crop changes it), and every split's batches
    hold what the first split's do: validation skips the training-only transforms, which must
    not be the ones that make the data fit the model (a crop, a conversion to float)."""
    import torch

    first = None
    for split, data in datasets.items():
        if data is None:
            continue
        batch = data.__getitems__(((0,), torch.arange(min(2, len(data)))))
        for key in model.input_keys:
            check_stream_fits_model(batch, data, key, model, split, source)
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


def check_stream_fits_model(batch, data, key, model, split, source):
    """A batch's samples of the model's input stream `key` have the per-sample shape the
    architecture gives it, and are integers where it declares int64 (indices an Embedding reads).
    (A float stream is not held to float32: a flow may convert what it reads.)"""
    shape, size, dtype = tuple(batch[key].shape[1:]), tuple(model.input_sizes[key]), model.input_dtypes[key]
    if shape != size:
        read = tuple(data.streams[key].shape[1:])
        how = "" if read == shape else f" after its batch transforms (read: {list(read)})"
        raise UserError(f"{source}: dataset.{key}: {split} samples have shape {list(shape)}{how}, but "
                        f"the architecture {model.architecture_path} expects input_size {list(size)}")
    if not dtype.is_floating_point and batch[key].dtype != dtype:
        name, got = dtype_name(dtype), dtype_name(batch[key].dtype)
        raise UserError(f"{source}: dataset.{key}: {split} samples are {got}, but the architecture "
                        f"{model.architecture_path} declares {key} dtype {name} (indices, e.g. class labels an "
                        f"Embedding reads); read the stream as {name} (e.g. file_reader_args: {{dtype: {name}}})")
