"""Reading data streams: the read types, n_inputs / randomize_inputs, postprocessing.

A training config's `dataset` section names one or more streams (e.g. `gen_inputs`,
`real_images`); each is read here into one tensor of samples (dim 0), once, before training.
The functions that do the reading are named in the config and live in dataset_functions.py.
"""
import torch
from tqdm import tqdm

import dataset_functions
from config import resolve_path
from errors import UserError, public_functions


def load_streams(dataset_cfg, seed, source):
    """{stream name: tensor of samples} for every stream of a validated dataset section."""
    fns = public_functions(dataset_functions)
    streams = {}
    for i, (name, cfg) in enumerate((k, v) for k, v in dataset_cfg.items() if k != "data_len_key"):
        generator = torch.Generator().manual_seed(seed + 1000 * (i + 1))  # one stream per seed
        streams[name] = read_stream(cfg, fns, generator, f"{source}: dataset.{name}")
    return streams


def read_stream(cfg, fns, generator, where):
    kind = cfg["data_read_type"]
    if kind == "function":
        if cfg["n_inputs"] is None:
            raise UserError(f"{where}.n_inputs: required for data_read_type function (how many samples to generate)")
        data = call(fns[cfg["data_generating_function"]], where, cfg["n_inputs"], generator,
                    **cfg["data_generating_function_args"])
    elif kind == "file":
        data = read_file(fns[cfg["file_reader"]], resolve_path(cfg["data_path"]), cfg["file_reader_args"], where)
    elif kind == "folder":
        data = read_folder(cfg, fns[cfg["file_reader"]], where)
    else:
        data = read_h5(resolve_path(cfg["data_path"]), cfg["h5_key"], where)
    data = select(data, cfg["n_inputs"], cfg["randomize_inputs"], generator, where)
    if cfg["data_read_postprocessing_fn"]:
        data = call(fns[cfg["data_read_postprocessing_fn"]], where, data, **cfg["data_read_postprocessing_fn_args"])
    return data.contiguous()


def call(fn, where, *args, **kwargs):
    """Call a user function; a wrong result type is reported against the stream's config."""
    out = fn(*args, **kwargs)
    if not isinstance(out, torch.Tensor):
        raise UserError(f"{where}: {fn.__name__} returned {type(out).__name__}, expected a torch.Tensor")
    return out


def read_file(reader, path, args, where):
    try:
        return call(reader, where, path, **args)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{where}: {reader.__name__} could not read {path}: {e}") from None


def read_folder(cfg, reader, where):
    """Every file (not hidden) in the folder, through the reader, stacked in name order."""
    folder = resolve_path(cfg["data_path"])
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"{where}.data_path: no files in {folder}")
    items = [read_file(reader, p, cfg["file_reader_args"], where)
             for p in tqdm(files, desc=f"reading {folder.name}", leave=False, disable=len(files) < 100)]
    per_sample = 1 if cfg["multiple_samples_per_file"] else 0  # dims of a file's tensor that are not a sample's
    shapes = {tuple(t.shape[per_sample:]) for t in items}
    if len(shapes) > 1:
        raise UserError(f"{where}: files in {folder} give samples of different shapes {sorted(shapes)}; "
                        "resize them in the file_reader")
    return torch.cat(items) if cfg["multiple_samples_per_file"] else torch.stack(items)


def read_h5(path, key, where):
    try:
        import h5py
    except ImportError:
        raise UserError(f"{where}.data_read_type: h5 needs the h5py package (pip install h5py)") from None
    with h5py.File(path, "r") as f:
        if key not in f:
            raise UserError(f"{where}.h5_key: no dataset {key!r} in {path}; it has: {', '.join(f.keys())}")
        return torch.from_numpy(f[key][...])


def select(data, n_inputs, randomize, generator, where):
    """The first n_inputs samples, or n_inputs drawn at random (seeded) when randomize is set."""
    if n_inputs is None or n_inputs == len(data):
        return data
    if n_inputs > len(data):
        raise UserError(f"{where}.n_inputs: {n_inputs} asked for, but the data has only {len(data)} samples")
    if randomize:
        return data[torch.randperm(len(data), generator=generator)[:n_inputs].sort().values]
    return data[:n_inputs]

