"""Held-out samples, measured at every epoch's end: each network's loss terms, and the outputs'
metrics against their targets (metrics.py: accuracy, PSNR, SSIM), averaged over every process."""
import torch
import torch.distributed as dist

from dataset_base import value_range
from engine import metrics
from engine.cli import targets_are_paired
from engine.network import Step
from engine.placement import share_buffers
from engine.sampling import first_samples
from engine.step import batch_size


class Validation:
    """The validation of a run: `loader` its held-out samples (None without a split); `steps`
    the step of each validation so far, as checkpoints keep them beside each network's
    validation_history."""

    def __init__(self, cfg, model, losses, networks, placement, loader, first_network, logbook):
        self.losses, self.networks, self.placement, self.loader = losses, networks, placement, loader
        self.model, self.logbook = model, logbook
        # accuracy, PSNR and SSIM for outputs paired with their targets, PSNR's range the target
        # stream's (held-out targets only for a guess, where none is declared)
        self.paired = targets_are_paired(model, losses.adversarial)
        self.value_range = None
        if loader is not None:
            targets = model.split_batch(first_samples(loader.dataset, 256))[1]
            if targets is not None and targets.dim() > 1:  # (images; class labels need no range)
                self.value_range = value_range(cfg["dataset"], model.target_key, targets)
        # the network whose rows carry the outputs' metrics (validation/<it>/psnr, ...): the
        # generator, or the first network to update of a flow's own step that has none by that name
        self.quality_network = "generator" if "generator" in networks else first_network
        self.steps = []

    @property
    def history(self):
        """As checkpoints keep it: {"step": [the step of each validation], network: {term: values}}."""
        return {"step": self.steps, **{name: net.validation_history for name, net in self.networks.items()}}

    def means(self, batches, step=0, epoch=0):
        """({(network, term): mean loss}, {metric: value}) over `batches` (the held-out loader,
        or the trial step's one batch), over every process."""
        return validation_means(self.losses, batches, self.networks, self.placement, self.paired,
                                self.value_range, step, epoch)

    def __call__(self, run, bar, step, epoch):
        """Validate now, on rank 0's buffers: {network: {term: mean}}, each network's means kept in
        its validation_history, the outputs' metrics beside the quality network's terms; logged
        and shown."""
        share_buffers(self.model, self.placement)
        means, quality = self.means(self.loader, step, epoch)
        means |= {(self.quality_network, name): value for name, value in quality.items()}
        result = {name: {} for name in self.networks}
        for (name, term), mean in means.items():
            result[name][term] = mean
            self.networks[name].validation_history.setdefault(term, []).append(mean)
        self.steps.append(step)
        self.logbook.validation(run, bar, epoch, step, means, quality)
        return result


def validation_means(losses, loader, networks, placement, paired, value_range, step_number=0, epoch=0):
    """({(network, term): mean over the held-out samples of every process}, {metric: value} of
    the model's outputs against their targets, metrics.py's, images' on the targets'
    `value_range` (dataset_base.ValueRange; none where it is not known)), in eval mode, each
    network's terms under its precision (`networks`: {name: Network}). No autograd, unless a
    loss term may need it (a loss function that penalises the discriminator's gradient, as
    WGAN-GP's; a flow's own step); and the random numbers the terms draw do not shift training's."""
    model = losses.model
    model.eval()
    sums, count, quality, kind = {}, 0, {}, None
    devices = [placement.device] if placement.device.type == "cuda" else []
    with torch.set_grad_enabled(losses.wants_discriminator or losses.own_step), torch.random.fork_rng(devices):
        for batch in loader:
            batch = losses.to_device(batch)
            inputs, targets = model.split_batch(batch)
            step = Step(step_number, epoch, training=False)
            outputs = None
            if not losses.own_step or targets is not None:
                outputs = step["outputs"] = losses.forward(inputs)  # (the built-in step's terms reuse them)
            for name, net in networks.items():
                with net.autocast():
                    total, terms = losses(name, batch, step)
                for term, value in {"total": total, **terms}.items():
                    sums[name, term] = sums.get((name, term), 0) + value.detach().float() * batch_size(batch)
            if outputs is not None:
                kind = metrics.kind_of(outputs.shape[1:], targets, paired)
                measured = metrics.names_of(kind, outputs.shape[1:], value_range)
                for metric, value in (metrics.batch_sums(kind, outputs, targets, value_range) if measured
                                      else {}).items():
                    quality[metric] = quality.get(metric, 0) + value
            count += batch_size(batch)
    model.train()
    totals = torch.stack([*sums.values(), *quality.values(), torch.tensor(float(count), device=placement.device)])
    if placement.world_size > 1:
        dist.all_reduce(totals)
    totals = totals.tolist()
    means = {key: value / totals[-1] for key, value in zip(sums, totals)}
    return means, metrics.finish(dict(zip(quality, totals[len(sums):-1])), value_range) if quality else {}
