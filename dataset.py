"""The torch Dataset of a run: batches are dicts of named streams. Adapt it to your data.

Streams are tensors held in memory, or folders read batch by batch (see dataset_base.py). A
batch is fetched with one indexing operation per stream (`__getitems__`), not sample by sample;
the batch transforms then run on the whole batch. Every batch carries the seed of its
transforms' random draws, fixed by (seed, process, epoch, batch number): a run draws the same
augmentations whichever worker process makes a batch, and a run resumed part way through an
epoch draws what the uninterrupted one would have.
"""
import os

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from dataset_base import FileStream
from engine.config import stream_configs
from engine.errors import UserError, kwargs_text
from engine.registry import batch_transforms


class PipelineDataset(Dataset):
    """Samples are {stream: tensor}. `indices` are the samples it holds (e.g. the training part of
    a split), counted in the epoch stream (data_len_key); a shorter stream wraps around (sample
    i of a stream of length n is i % n)."""

    def __init__(self, streams, indices, transforms=()):
        self.streams, self.indices, self.transforms = streams, indices, list(transforms)
        needed = int(indices.max()) + 1 if len(indices) else 0
        self.wraps = {name for name, data in streams.items() if len(data) < needed}
        self.holds_all = torch.equal(indices, torch.arange(len(indices)))  # positions are indices: skip a lookup

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        return {name: x[0] for name, x in self.__getitems__(((0,), torch.tensor([position]))).items()}

    def __getitems__(self, item):
        """item: (the batch's key, ints such as (seed, rank, epoch, batch number) that seed its
        random transforms; a tensor of the positions of its samples in this dataset)."""
        key, positions = item
        index = positions if self.holds_all else self.indices[positions]
        batch = {name: data[index % len(data) if name in self.wraps else index] for name, data in self.streams.items()}
        if self.transforms:
            generator = torch.Generator().manual_seed(batch_seed(key))
            for transform in self.transforms:
                transform(batch, generator)
        return batch

    @property
    def per_sample_work(self):
        """Whether making a batch runs Python per sample (files read from disk, a torchvision
        transform): then worker processes pay off."""
        return any(t.per_sample for t in self.transforms) or \
            any(isinstance(s, FileStream) for s in self.streams.values())


class Transform:
    """One batch transform on one or more streams, which all get the same random draws: a
    function of dataset_functions.py (on the whole batch) or a torchvision.transforms.v2 class
    (sample by sample; samples [C, H, W] of several streams go in together as images, which v2
    transforms alike)."""

    def __init__(self, name, args, streams, where):
        fn = batch_transforms()[name]
        self.name, self.streams, self.where = name, streams, where
        self.per_sample = isinstance(fn, type)
        if self.per_sample:
            try:
                self.fn, self.args = fn(**args), {}
            except (TypeError, ValueError) as e:
                raise UserError(f"{where}: {name}({kwargs_text(args)}) cannot be built: {e}") from None
        else:
            self.fn, self.args = fn, args

    def __call__(self, batch, generator):
        seed = int(torch.randint(2**62, (), generator=generator))
        try:
            if self.per_sample:
                self.apply_per_sample(batch, seed)
            else:
                for name in self.streams:  # (a generator on the batch's device: dataset.on_device)
                    stream_generator = torch.Generator(batch[name].device).manual_seed(seed)
                    batch[name] = self.fn(batch[name], stream_generator, **self.args)
        except (TypeError, ValueError, RuntimeError, IndexError) as e:
            shapes = ", ".join(f"{name} {list(batch[name].shape)}" for name in self.streams)
            raise UserError(f"{self.where}: {self.name} failed on a batch of {shapes}: {e}") from None

    def apply_per_sample(self, batch, seed):
        # v2 transforms draw from torch's global generator: give them one seeded from the batch's
        # seed, and leave the global one as it was (dropout and initialisation use it).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # (torch.manual_seed would reseed the GPUs too)
            outs = []
            for i in range(len(batch[self.streams[0]])):
                out = self.fn(*[as_image(batch[name][i]) for name in self.streams])
                outs.append(out if len(self.streams) > 1 else (out,))
        for j, name in enumerate(self.streams):
            batch[name] = torch.stack([from_image(out[j], batch[name][0]) for out in outs])


def as_image(sample):
    """v2 transforms alike every image they are given together, but only the first plain tensor.
    A 2-d sample [H, W] becomes an image [1, H, W] (see from_image); 1-d ones (labels) pass through."""
    return tv_tensors.Image(sample) if sample.dim() >= 2 else sample


def from_image(out, sample):
    out = out.as_subclass(torch.Tensor)
    return out.squeeze(0) if sample.dim() == 2 else out


def build_dataset(streams, dataset_cfg, indices, training, where):
    """The dataset of `indices` with its batch transforms: for training every one (each stream's
    data_batch_transform, then dataset.batch_transforms in order); for validation and
    evaluation only the batch_transforms marked in_evaluation."""
    steps = []
    if training:
        steps += [Transform(s["data_batch_transform"], s["data_batch_transform_args"], [name],
                            f"{where}.{name}.data_batch_transform")
                  for name, s in stream_configs(dataset_cfg).items() if s["data_batch_transform"]]
    steps += [Transform(e["transform"], e["args"], e["streams"], f"{where}.batch_transforms[{i}]")
              for i, e in enumerate(dataset_cfg["batch_transforms"]) if training or e["in_evaluation"]]
    return PipelineDataset(streams, indices, steps)


def batch_seed(key):
    """The seed of a batch's random transforms: the ints of its key mixed by splitmix64's
    finaliser (a few microseconds, and the same on every Python and numpy version)."""
    seed = 0
    for word in key if isinstance(key, tuple) else (key,):
        seed = (seed ^ word) + 0x9E3779B97F4A7C15 & MASK_64
        seed = (seed ^ seed >> 30) * 0xBF58476D1CE4E5B9 & MASK_64
        seed = (seed ^ seed >> 27) * 0x94D049BB133111EB & MASK_64
        seed ^= seed >> 31
    return seed >> 1  # torch seeds are below 2**63


MASK_64 = 2**64 - 1


class EpochBatches:
    """The training batches of one process: positions in an order fixed by (seed, epoch), cut
    into batches of `batch_size`. The order is torch's DistributedSampler's (under DDP each of
    the `num_replicas` processes gets its own shard of the shuffled positions), computed as one
    tensor: DistributedSampler builds it as a Python list, which for small samples costs as
    much as the indexing itself."""

    def __init__(self, n, batch_size, seed, shuffle=True, num_replicas=1, rank=0, device=None):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.device = device  # where the positions go, once per epoch: the data's device (dataset.on_device)
        self.num_samples = -(-n // num_replicas)  # per process; the last shard is padded by repeats
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        """Start `epoch`, leaving out its first `skip` batches (those a resumed run trained on;
        len() stays the whole epoch's)."""
        self.epoch, self.skip = epoch, skip

    def order(self):
        """This process's positions for the epoch: DistributedSampler(range(n), ...).set_epoch(epoch)."""
        if self.shuffle:
            positions = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            positions = torch.arange(self.n)
        total = self.num_samples * self.num_replicas
        if total > self.n:
            positions = positions.repeat(-(-total // self.n))[:total]
        return positions[self.rank:total:self.num_replicas]

    def __iter__(self):
        positions = self.order() if self.device is None else self.order().to(self.device)
        for b in range(self.skip, -(-len(positions) // self.batch_size)):
            yield (self.seed, self.rank, self.epoch, b), positions[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self):
        return -(-self.num_samples // self.batch_size)


class FixedBatches:
    """Positions in order, in batches, with the same seeds every time (validation, evaluation).
    Under DDP each process takes every num_replicas-th position, without padding, so that every
    sample counts once."""

    def __init__(self, n, batch_size, seed, num_replicas=1, rank=0, device=None):
        self.positions = torch.arange(rank, n, num_replicas, device=device)
        self.batch_size, self.seed, self.rank = batch_size, seed, rank

    def __iter__(self):
        for b, start in enumerate(range(0, len(self.positions), self.batch_size)):
            yield (self.seed, self.rank, b), self.positions[start:start + self.batch_size]

    def __len__(self):
        return -(-len(self.positions) // self.batch_size)


class BatchLoader:
    """What DataLoader does with num_workers=0, minus its bookkeeping (about 20 us a batch, a
    fifth of the time a batch of small in-memory samples takes to index): the sampler's batches,
    made in this process."""

    def __init__(self, dataset, batch_sampler, pin_memory=False):
        self.dataset, self.batch_sampler, self.pin_memory = dataset, batch_sampler, pin_memory

    def __iter__(self):
        for item in self.batch_sampler:
            batch = self.dataset.__getitems__(item)
            yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    def __len__(self):
        return len(self.batch_sampler)


class WorkerLoader(DataLoader):
    """torch's DataLoader, with a user error raised in a worker (an unreadable file) reported as
    its message alone rather than inside the worker's traceback."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except UserError as e:
            raise UserError(str(e).rsplit("UserError: ", 1)[-1].strip()) from None


def keep_batch(batch):
    """collate_fn: `__getitems__` already returns a whole batch."""
    return batch


def loading_settings(dataset_cfg, dataset, on_gpu, world_size, where):
    """num_workers, pin_memory and persistent_workers: the config's, or defaults that fit the data.
    Batches made by a few indexing ops are fastest in this process; per-sample transforms get
    worker processes (up to 4 per training process)."""
    workers = dataset_cfg["num_workers"]
    if workers is None:
        workers = min(4, (os.cpu_count() or 1) // world_size) if dataset.per_sample_work else 0
    persistent = dataset_cfg["persistent_workers"]
    if persistent and workers == 0:
        raise UserError(f"{where}.persistent_workers: true needs worker processes; set {where}.num_workers above 0")
    pin = dataset_cfg["pin_memory"]
    return {"num_workers": workers, "pin_memory": on_gpu if pin is None else pin and torch.cuda.is_available(),
            "persistent_workers": workers > 0 if persistent is None else persistent}


# dataset.on_device: null puts the data on the GPU when it takes at most this share of its free
# memory, leaving the rest to the model, its activations and the optimizer's state.
ON_DEVICE_SHARE = 0.25


def on_device(dataset_cfg, datasets, device, where):
    """Whether the streams of `datasets` (training and validation, which share them) move to the
    training GPU, and then move them: every batch is then cut out of tensors already there, with
    no copy and no worker per step. It needs every stream in memory (not in_memory: false) and
    only batch transforms of dataset_functions.py, which then run on the GPU; dataset.on_device
    says whether, null deciding by the size (ON_DEVICE_SHARE of the free memory)."""
    wanted = dataset_cfg["on_device"]
    if wanted is False or (wanted is None and device.type != "cuda"):
        return False
    if device.type != "cuda":
        raise UserError(f"{where}.on_device: true keeps the data on the training GPU, but this run trains on the "
                        f"{device.type}; set training.gpus, or on_device to null")
    dataset = datasets[0]
    why_not = kept_off_device(dataset, dataset_cfg["num_workers"])
    if why_not and wanted:
        raise UserError(f"{where}.on_device: true, but {why_not}; set on_device to null or false")
    if why_not:
        return False
    size = sum(data.element_size() * data.nelement() for data in dataset.streams.values())
    free = torch.cuda.mem_get_info(device)[0]
    if wanted is None and size > ON_DEVICE_SHARE * free:
        return False
    if size > free:
        raise UserError(f"{where}.on_device: true, but the data takes {size / 2**30:.2f} GiB and {device} has "
                        f"{free / 2**30:.2f} GiB free; set on_device to null or false")
    for name, data in dataset.streams.items():
        dataset.streams[name] = data.to(device)  # (the dicts are shared: validation's too)
    for d in datasets:
        d.indices = d.indices.to(device)
    return True


def kept_off_device(dataset, num_workers):
    """Why the dataset's batches cannot be cut on the GPU, or None."""
    files = [name for name, data in dataset.streams.items() if isinstance(data, FileStream)]
    if files:
        return f"the stream(s) {', '.join(files)} are read from disk batch by batch (in_memory: false)"
    per_sample = [t.name for t in dataset.transforms if t.per_sample]
    if per_sample:
        return f"the torchvision transform(s) {', '.join(per_sample)} run sample by sample, on the CPU"
    if num_workers:
        return f"num_workers: {num_workers} asks for worker processes, which cannot share GPU memory"
    return None


def make_loader(dataset, batch_sampler, num_workers=0, pin_memory=False, persistent_workers=False):
    """Batches of `dataset` as `batch_sampler` orders them: made here, or by worker processes."""
    if num_workers == 0:
        return BatchLoader(dataset, batch_sampler, pin_memory)
    return WorkerLoader(dataset, batch_sampler=batch_sampler, collate_fn=keep_batch, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=persistent_workers,
                      # Workers' seeds come from here, not from the global generator, whose draws
                      # would otherwise shift with the number of epochs run.
                      generator=torch.Generator().manual_seed(0))
