"""The torch Dataset of a run: batches are dicts of named streams. Adapt it to your data.

Streams are tensors held in memory (see dataset_base.py). A batch is fetched with one indexing
operation per stream (`__getitems__`), not sample by sample, and each stream's
`data_batch_transform` is applied to the whole batch.
"""
import itertools

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import dataset_functions
from errors import public_functions


class PipelineDataset(Dataset):
    """Samples are {stream: tensor}. Its length is the `len_key` stream's; shorter streams wrap
    around (sample i of a stream of length n is i % n)."""

    def __init__(self, streams, len_key, transforms=None, seed=0):
        self.streams, self.len_key = streams, len_key
        self.transforms = transforms or {}  # stream -> (fn, kwargs)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.streams[self.len_key])

    def __getitem__(self, index):
        return {name: x[0] for name, x in self.__getitems__([index]).items()}

    def __getitems__(self, indices):
        index = torch.as_tensor(indices)
        batch = {}
        for name, data in self.streams.items():
            batch[name] = data[index % len(data)]
            if name in self.transforms:
                fn, kwargs = self.transforms[name]
                batch[name] = fn(batch[name], self.generator, **kwargs)
        return batch


def keep_batch(batch):
    """collate_fn: `__getitems__` already returns a whole batch."""
    return batch


def build_dataset(streams, dataset_cfg, seed):
    fns = public_functions(dataset_functions)
    transforms = {name: (fns[cfg["data_batch_transform"]], cfg["data_batch_transform_args"])
                  for name, cfg in dataset_cfg.items()
                  if name != "data_len_key" and cfg["data_batch_transform"]}
    return PipelineDataset(streams, dataset_cfg["data_len_key"], transforms, seed)


class EpochSampler(DistributedSampler):
    """Sample order fixed by (seed, epoch) alone, as DistributedSampler makes it, so a run resumed
    part way through an epoch can skip the samples it already trained on. Under DDP each of the
    `num_replicas` processes reads its own shard; a single process reads everything."""

    def __init__(self, dataset, seed, shuffle=True, num_replicas=1, rank=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        """Start `epoch`, leaving out its first `skip` samples (of this process's shard)."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return self.num_samples - self.skip


def make_loader(dataset, batch_size, seed, shuffle=True, num_replicas=1, rank=0):
    """A DataLoader over `dataset` whose order depends only on the seed and the epoch."""
    sampler = EpochSampler(dataset, seed, shuffle, num_replicas, rank)
    # The loader draws a seed for its workers every epoch; a generator of its own keeps that
    # draw out of the global RNG.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=keep_batch, generator=generator)
