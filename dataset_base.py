"""Reading data streams: the read types, n_inputs / randomize_inputs, postprocessing, and the
split into training and validation samples.

A training config's `dataset` section names one or more streams (e.g. `gen_inputs`,
`real_images`); each is read here into one tensor of samples (dim 0), once, before training, or
for a folder with `in_memory: false`, into a FileStream that reads its files batch by batch.
The functions that do the reading are named in the config and live in dataset_functions.py.
A folder of class folders (`class_folders: true`, <data_path>/<class>/<file>) is read as one
stream of samples, and a `class_labels` stream beside it holds each sample's class index.
"""
import inspect
import math
import zipfile
from typing import NamedTuple

import torch
from tqdm import tqdm

from engine.config import postprocessing_steps, resolve_path, stream_configs
from engine.dashboard import known_range
from engine.errors import UserError, kwargs_text, user_code_error
from engine.registry import batch_transforms, dataset_functions


def load_streams(dataset_cfg, seed, source):
    """{stream name: tensor of samples} for every stream of a validated dataset section."""
    fns = dataset_functions()
    configs = stream_configs(dataset_cfg)
    streams = {}
    for i, (name, cfg) in enumerate(configs.items()):
        if cfg["data_read_type"] == "class_labels":  # once the streams they label are read (below)
            continue
        generator = torch.Generator().manual_seed(seed + 1000 * (i + 1))  # one stream per seed
        streams[name] = read_stream(cfg, fns, generator, dataset_cfg["split_seed"], f"{source}: dataset.{name}")
    for name, cfg in configs.items():
        if cfg["data_read_type"] == "class_labels":
            # The labels of the files the labelled stream holds: select() picks the same ones.
            folder = configs[cfg["labels_of"]]
            labels = class_folder_files(resolve_path(folder["data_path"]), f"{source}: dataset.{cfg['labels_of']}")[1]
            streams[name] = select(labels, folder["n_inputs"], folder["randomize_inputs"], dataset_cfg["split_seed"],
                                   f"{source}: dataset.{cfg['labels_of']}")
    for name, stream in streams.items():
        if len(stream) == 0:  # (a batch of it could not be made: not one step of an epoch)
            made = f"read from {configs[name]['data_path']}" if configs[name].get("data_path") else "made"
            raise UserError(f"{source}: dataset.{name}: 0 samples {made}; every stream needs at least one sample "
                            "(a shorter stream than data_len_key's wraps around, an empty one cannot)")
    return {name: streams[name] for name in configs}


def stream_classes(dataset_cfg, source):
    """{class_labels stream: the class names of its labels, in index order (sorted folder names)}."""
    configs = stream_configs(dataset_cfg)
    return {name: class_folder_files(resolve_path(configs[cfg["labels_of"]]["data_path"]),
                                     f"{source}: dataset.{cfg['labels_of']}", names_only=True)
            for name, cfg in configs.items() if cfg["data_read_type"] == "class_labels"}


def check_same_classes(trained, now, dataset_cfg, what, source):
    """Each class_labels stream's classes (`now`, stream_classes) are those `what` (a checkpoint)
    was trained on (`trained`, its record): else class index i would mean another class."""
    configs = stream_configs(dataset_cfg)
    for name, classes in (trained or {}).items():
        if name not in now or now[name] == list(classes):
            continue
        labelled = configs[name]["labels_of"]
        missing, extra = [c for c in classes if c not in now[name]], [c for c in now[name] if c not in classes]
        differ = ", ".join([f"lacks {missing}"] * bool(missing) + [f"has {extra} besides"] * bool(extra))
        raise UserError(f"{source}: dataset.{labelled}.data_path: {resolve_path(configs[labelled]['data_path'])} has "
                        f"the class folders {now[name]}, but {what} was trained on {list(classes)}: it {differ}; give "
                        "a folder with the same class folders, so that class index i means the same class")


def read_stream(cfg, fns, generator, choice_seed, where):
    kind = cfg["data_read_type"]
    if kind == "function":
        if cfg["n_inputs"] is None:
            raise UserError(f"{where}.n_inputs: required for data_read_type function (how many samples to generate)")
        fn, args = fns[cfg["data_generating_function"]], cfg["data_generating_function_args"]
        one = call(fn, f"{where}.data_generating_function_args", 1, torch.Generator().manual_seed(0), **args)
        check_fits_memory(cfg["n_inputs"] * one.element_size() * one.nelement(), f"{where}.n_inputs")
        data = call(fn, f"{where}.data_generating_function_args", cfg["n_inputs"], generator, **args)
    elif kind == "file":
        data = read_file(fns[cfg["file_reader"]], resolve_path(cfg["data_path"]), cfg["file_reader_args"], where)
    elif kind == "folder" and not cfg["in_memory"]:
        data = FileStream(stream_files(cfg, fns, where), fns[cfg["file_reader"]], cfg["file_reader_args"], where)
    elif kind == "folder":
        data = read_folder(cfg, fns, where)
    else:
        data = read_h5(resolve_path(cfg["data_path"]), cfg["h5_key"], where)
    data = select(data, cfg["n_inputs"], cfg["randomize_inputs"], choice_seed, where)
    if isinstance(data, FileStream):
        return data
    for i, (name, args) in enumerate(postprocessing_steps(cfg)):
        step = f"{where}.data_read_postprocessing_fn" + (f"[{i}]" if isinstance(cfg["data_read_postprocessing_fn"],
                                                                              list) else "")
        data = call(fns[name], step, data, **args)
    return data.contiguous()


def call(fn, where, *args, **kwargs):
    """Call a function of dataset_functions.py that the config names, with its arguments there
    (`where`: their key); what it raises, and a result that is not a tensor, are user errors
    naming the key, the call and the user's frames."""
    try:
        out = fn(*args, **kwargs)
    except UserError:
        raise
    except MemoryError:
        raise UserError(f"{where}: {fn.__name__}({kwargs_text(kwargs)}) ran out of memory; ask for less") from None
    except Exception as e:
        raise user_code_error(e, f"{where}: {fn.__name__}({kwargs_text(kwargs)})") from None
    return tensor_from(fn, out, where)


def tensor_from(fn, out, where):
    if not isinstance(out, torch.Tensor):
        raise UserError(f"{where}: {fn.__name__} returned {type(out).__name__}, expected a torch.Tensor")
    return out


def check_fits_memory(n_bytes, where):
    """A stream that would take more memory than the machine has free is refused before it is
    made (an allocator error would name neither the key nor the size)."""
    free = available_memory()
    if free is not None and n_bytes > free:
        raise UserError(f"{where}: the stream would take {n_bytes / 2**30:.1f} GiB in memory, and this machine has "
                        f"{free / 2**30:.1f} GiB available; ask for fewer samples")


def available_memory():
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def read_file(reader, path, args, where):
    try:
        out = reader(path, **args)
    # (TypeError: e.g. an array of Python objects, which torch cannot hold)
    except (OSError, ValueError, RuntimeError, EOFError, TypeError, zipfile.BadZipFile) as e:
        raise UserError(f"{where}: {reader.__name__} could not read {path}: {e}") from None
    except UserError:
        raise
    except Exception as e:
        raise user_code_error(e, f"{where}: {reader.__name__}({path}, {kwargs_text(args)})") from None
    return tensor_from(reader, out, where)


def stream_files(cfg, fns, where):
    """The files of a folder stream, in order: its class folders' one after the other, or the folder's."""
    folder = resolve_path(cfg["data_path"])
    files = class_folder_files(folder, where)[0] if cfg["class_folders"] else folder_files(folder, where)
    if fns[cfg["file_reader"]] is fns["read_image"]:
        check_images(files, where)
    return files


def visible(folder):
    """The entries of a folder that are not hidden (.DS_Store, .ipynb_checkpoints), in name order."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def folder_files(folder, where):
    """The files of a folder stream: every one not hidden, in name order."""
    files = [p for p in visible(folder) if p.is_file()]
    if not files:
        raise UserError(f"{where}.data_path: no files in {folder}")
    return files


def class_folder_files(folder, where, names_only=False):
    """(every file of the class folders, each one's class index (int64), the class names) of a
    class_folders stream: folder/<class>/<file>, classes in sorted name order as torchvision's
    ImageFolder has them, files within a class in name order. With names_only, the names alone."""
    classes = [p for p in visible(folder) if p.is_dir()]
    if not classes:
        raise UserError(f"{where}.data_path: {folder} holds no class folders (class_folders: true reads "
                        f"{folder}/<class>/<file>); for a folder of files alone, set class_folders: false")
    if names_only:
        return [p.name for p in classes]
    files, labels = [], []
    for index, class_folder in enumerate(classes):
        found = [p for p in visible(class_folder) if p.is_file()]
        if not found:
            raise UserError(f"{where}.data_path: the class folder {class_folder} holds no files; remove it, or add "
                            "the class's samples")
        files += found
        labels += [index] * len(found)
    return files, torch.tensor(labels, dtype=torch.int64), [p.name for p in classes]


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif"}  # what read_image (torchvision.io) decodes


def check_images(files, where):
    """read_image's files all end as images do: one stray file (notes.txt) would otherwise stop a
    run that reads its files batch by batch in the middle of an epoch."""
    strays = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if strays:
        raise UserError(f"{where}.data_path: {strays[0]} is not an image file that read_image reads "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})" + (f"; and {len(strays) - 1} more" if len(strays) > 1
                                                                    else "") + "; move it out of the folder")


def read_folder(cfg, fns, where):
    """Every file of the folder (or of its class folders) through the reader, stacked."""
    folder, reader = resolve_path(cfg["data_path"]), fns[cfg["file_reader"]]
    files = stream_files(cfg, fns, where)
    items = [read_file(reader, p, cfg["file_reader_args"], where)
             for p in tqdm(files, desc=f"reading {folder.name}", leave=False, disable=len(files) < 100)]
    per_sample = 1 if cfg["multiple_samples_per_file"] else 0  # dims of a file's tensor that are not a sample's
    shapes = {tuple(t.shape[per_sample:]) for t in items}
    if len(shapes) > 1:
        first = {}
        for p, t in zip(files, items):
            first.setdefault(tuple(t.shape[per_sample:]), p)
        examples = "; ".join(f"{list(shape)} ({p})" for shape, p in list(first.items())[:3])
        raise UserError(f"{where}: files in {folder} give samples of different shapes: {examples}; resize them in "
                        "the file_reader (read_image: size and crop)")
    return torch.cat(items) if cfg["multiple_samples_per_file"] else torch.stack(items)


def read_h5(path, key, where):
    try:
        import h5py
    except ImportError:
        raise UserError(f"{where}.data_read_type: h5 needs the h5py package (pip install h5py)") from None
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise UserError(f"{where}.h5_key: no dataset {key!r} in {path}; it has: {', '.join(f.keys())}")
            return torch.from_numpy(f[key][...])
    except OSError as e:
        raise UserError(f"{where}: could not read {path} as HDF5: {e}") from None


def select(data, n_inputs, randomize, seed, where):
    """The first n_inputs samples, or n_inputs drawn at random when randomize is set. The draw
    depends only on `seed` (dataset.split_seed) and the stream's length, so streams paired by
    index keep the same samples, and runs with other training seeds the same data."""
    if n_inputs is None or n_inputs == len(data):
        return data
    if n_inputs > len(data):
        raise UserError(f"{where}.n_inputs: {n_inputs} asked for, but the data has only {len(data)} samples")
    if randomize:
        chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n_inputs].sort().values
    else:
        chosen = torch.arange(n_inputs)
    return data.select(chosen) if isinstance(data, FileStream) else data[chosen]


class FileStream:
    """A folder stream left on disk (`in_memory: false`): indexing it with a tensor of sample
    indices reads those files, one sample each, and stacks them. For data larger than memory;
    loader worker processes then do the reading in parallel with training."""

    def __init__(self, files, reader, args, where):
        self.files, self.reader, self.args, self.where = files, reader, args, where
        self._first = None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        indices = torch.as_tensor(index).tolist()
        samples = [read_file(self.reader, self.files[i], self.args, self.where) for i in indices]
        for sample, i in zip(samples, indices):
            if sample.shape != self.sample_shape:
                raise UserError(f"{self.where}: {self.files[i]} gives a sample of shape {list(sample.shape)}, but "
                                f"{self.files[0]} one of {list(self.sample_shape)}; resize them in the file_reader")
        return torch.stack(samples)

    @property
    def sample_shape(self):
        return self.first_sample.shape

    @property
    def first_sample(self):
        if self._first is None:  # read once
            self._first = read_file(self.reader, self.files[0], self.args, self.where)
        return self._first

    @property
    def shape(self):
        return torch.Size([len(self), *self.sample_shape])

    @property
    def dtype(self):
        return self.first_sample.dtype

    def select(self, index):
        """The stream of the files at `index` (still on disk)."""
        return FileStream([self.files[i] for i in index.tolist()], self.reader, self.args, self.where)


# ---- the range of a stream's values ------------------------------------------------------------
class ValueRange(NamedTuple):
    """The range [low, high] a stream's values are made in (both None where it is not known), and
    `how` it is known: declared (by the stream's value_range key, or by a function of its chain),
    guessed from its values, or why it is not known. PSNR and SSIM, Inception's features and
    evaluate.py's pictures use it, and say `how`."""
    low: float | None
    high: float | None
    how: str
    declared: bool = False  # by the stream's key or a function, not guessed

    @property
    def known(self):
        return self.low is not None


# torchvision.transforms.v2 classes that rescale values: after them no range is known
RESCALING_TRANSFORMS = ("Normalize", "ToDtype", "ConvertImageDtype", "LinearTransformation")


def value_range(dataset_cfg, stream, values=None):
    """The range of `stream`'s values as validation and evaluate.py see them, a ValueRange: its
    value_range key; else the last range declared along the chain that makes it (declared_range);
    else a guess from `values` that tolerates an overshoot (dashboard.known_range: [0, 1], [-1, 1],
    or [0, 255] for whole numbers); else not known. `stream` None: values that no stream makes (a
    GAN's outputs without a target stream), whose range can only be guessed."""
    s = stream_configs(dataset_cfg).get(stream) if stream is not None else None
    key = f"dataset.{stream}.value_range"
    if s is not None and s.get("value_range") is not None:
        low, high = s["value_range"]
        return ValueRange(float(low), float(high), f"declared by {key}", True)
    declared = declared_range(dataset_cfg, stream) if s is not None else None
    if declared is not None:
        (low, high), by = declared
        return ValueRange(float(low), float(high), f"declared by {by}", True)
    unset = f"nothing declares it: set {key}" if s is not None else "no data stream declares it"
    guess = known_range(values) if values is not None and values.numel() else None
    if guess is not None:
        return ValueRange(*guess, f"guessed from the values ({unset})")
    return ValueRange(None, None, f"not known: the values fit none of [0, 1], [-1, 1], [0, 255] and {unset}")


def declared_range(dataset_cfg, stream):
    """((low, high), what declared it) of the last declaration along `stream`'s chain, or None:
    its file_reader or data_generating_function, its data_read_postprocessing_fn in order, then
    the dataset.batch_transforms entries with in_evaluation that list it (validation and
    evaluate.py see no others). A function declares with its `value_range` attribute (see
    dataset_functions.py); one without keeps the range before it, and a declaration of None
    (normalize) forgets it."""
    s, where = stream_configs(dataset_cfg)[stream], f"dataset.{stream}"
    chain = []  # (function name, its arguments, arguments the pipeline passes first, its key)
    if s["data_read_type"] in ("file", "folder"):
        chain.append((s["file_reader"], s["file_reader_args"], 1, f"{where}.file_reader"))
    elif s["data_read_type"] == "function":
        chain.append((s["data_generating_function"], s["data_generating_function_args"], 2,
                      f"{where}.data_generating_function"))
    chain += [(name, args, 1, f"{where}.data_read_postprocessing_fn") for name, args in postprocessing_steps(s)]
    chain += [(entry["transform"], entry["args"], 2, f"dataset.batch_transforms[{i}]")
              for i, entry in enumerate(dataset_cfg["batch_transforms"])
              if entry["in_evaluation"] and stream in entry["streams"]]
    found = None
    for name, args, passed, key in chain:
        fn = dataset_functions().get(name) or batch_transforms().get(name)
        if isinstance(fn, type):  # a torchvision class
            found = None if name in RESCALING_TRANSFORMS else found
        elif hasattr(fn, "value_range"):
            declared = declared_by(fn, args, passed, f"{key}: {name}")
            found = None if declared is None else (declared, f"{name} ({key})")
    return found


def declared_by(fn, args, passed, where):
    """The range `fn.value_range` declares for these arguments (those after the `passed` ones
    the pipeline gives, defaults filled in), checked: (low, high) or None."""
    declared = fn.value_range
    if callable(declared):
        params = list(inspect.signature(fn).parameters.values())[passed:]
        every = {p.name: p.default for p in params if p.default is not p.empty} | args
        try:
            declared = declared(**every)
        except Exception as e:
            raise user_code_error(e, f"{where}: {fn.__name__}.value_range({kwargs_text(every)})") from None
    if declared is None:
        return None
    if not (isinstance(declared, (tuple, list)) and len(declared) == 2
            and all(isinstance(x, (int, float)) and math.isfinite(x) for x in declared) and declared[0] < declared[1]):
        raise UserError(f"{where}: dataset_functions.py: {fn.__name__}.value_range gives {declared!r}; it must give "
                        "(low, high), two finite numbers with low < high, or None where the range is not known")
    return tuple(declared)


def split_indices(n, validation_fraction, seed, where):
    """(training, validation) sample indices, each sorted: round(n * validation_fraction) of the n
    samples, drawn at random from `seed`, are held out. Validation is None without a split."""
    everything = torch.arange(n)
    if not validation_fraction:
        return everything, None
    n_validation = round(n * validation_fraction)
    if not 0 < n_validation < n:
        raise UserError(f"{where}.validation_fraction: {validation_fraction} of {n} samples leaves "
                        f"{n_validation} for validation and {n - n_validation} for training; both need at least one")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_validation:].sort().values, order[:n_validation].sort().values
