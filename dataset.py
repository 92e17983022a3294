"""The torch Dataset of a run: batches are dicts of named streams. Adapt it to your data.

Streams are tensors held in memory (see dataset_base.py). A batch is fetched with one indexing
operation per stream (`__getitems__`), not sample by sample, and each stream's
`data_batch_transform` is applied to the whole batch.
"""
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


def make_loader(dataset, batch_size, seed, shuffle=True, distributed=False, drop_last=False):
    """A DataLoader over `dataset`; under DDP each process reads its own shard."""
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last) if distributed else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      drop_last=drop_last, collate_fn=keep_batch, generator=generator)
