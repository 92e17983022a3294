"""The model's outputs outside training: the picture the dashboard shows at an epoch's end, and
the samples the sample metrics measure. In eval mode, without autograd, with the networks' moving
averages where asked, and without drawing from training's random numbers."""
import contextlib

import torch

from dataset_base import value_range
from engine.model_base import inputs_to, split_inputs
from engine.preflight import eagerly
from engine.sample_metrics import weights_of


class Sampler:
    """The model's inference path (`forward`, under the run's precision through `losses`) on the
    fixed inputs of the first `n_images` samples of `dataset`, the same at every epoch."""

    def __init__(self, model, networks, losses, placement, batch_size, dataset, n_images, data_cfg, source):
        self.model, self.networks, self.losses, self.source = model, networks, losses, source
        self.device, self.is_main, self.batch_size = placement.device, placement.is_main, batch_size
        batch = first_samples(dataset, n_images)
        self.fixed_inputs = model.split_batch(batch)[0]
        # a flow that draws its own sample picture (sample_rows) gets the fixed samples' every stream
        self.fixed_batch = batch if callable(getattr(model, "sample_rows", None)) else None
        # what the dashboard shows the outputs on: the range the target stream declares, if it does
        declared = value_range(data_cfg, model.target_key) if model.target_key is not None else None
        self.image_range = (declared.low, declared.high) if declared is not None and declared.declared else None

    def sample_outputs(self):
        """What the dashboard shows at an epoch's end: (images, row names). The model's outputs on
        the fixed inputs (row names None); or, from a flow that draws its own picture, the rows its
        `sample_rows(batch)` gives ({row name: images}, e.g. one per class), stacked."""
        if self.fixed_batch is None:
            return self.generate(self.fixed_inputs), None
        with self.inference():
            rows = self.model.sample_rows(self.losses.to_device(self.fixed_batch))
        return torch.cat([images.float().cpu() for images in rows.values()]), list(rows)

    @torch.no_grad()
    def measure(self, samples, run, bar, epoch, step):
        """The sample metrics (`samples`: a sample_metrics.SampleMetrics) of the generator, with its
        EMA weights when it keeps them, on their fixed inputs; logged as sample/<key> and shown.
        Rank 0 alone measures: the other processes go on to the next collective and wait there."""
        if not self.is_main:
            return {}
        outputs = self.generate(samples.inputs, use_ema=True)
        values = {f"sample/{k}": v for k, v in samples(outputs, f"{self.source}: sample_metrics").items()}
        run.log([{"epoch": epoch, "step": step, **values}])
        bar.write(f"epoch {epoch}: " + ", ".join(f"{k.removeprefix('sample/')} {v:.4g}" for k, v in values.items())
                  + f" ({len(outputs)} samples, {samples.features.name})")
        return values

    def generate(self, inputs, use_ema=False):
        """The model's outputs for `inputs`, batch_size at a time, on the CPU (see inference)."""
        with self.inference(use_ema):
            return torch.cat([self.losses.forward(inputs_to(x, self.device)).float().cpu()
                              for x in split_inputs(inputs, self.batch_size)])

    @contextlib.contextmanager
    def inference(self, use_ema=False):
        """The model in eval mode, without autograd and without drawing from training's random
        numbers; with `use_ema`, with the moving averages of the networks' weights where they keep
        them. Compiled submodels run eagerly: eval mode would otherwise compile them a second time."""
        self.model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng([self.device] if self.device.type == "cuda" else []), \
                    eagerly(), contextlib.ExitStack() as averaged:
                for net in self.networks.values():
                    if use_ema and net.ema is not None:
                        averaged.enter_context(weights_of(net.module, net.ema.module.state_dict()))
                yield
        finally:
            self.model.train()


def first_samples(dataset, n):
    """A batch of the dataset's first `n` samples (fewer if it has fewer), in its own order (not
    the shuffled one) and made as its batches are made, without drawing from the run's random
    numbers: the same samples at every epoch and in every run of a config."""
    return dataset.__getitems__(((0,), torch.arange(min(n, len(dataset)))))
