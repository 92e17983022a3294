"""What the steps leave for people to read: each network's loss terms in its loss_history and in
metrics.jsonl (through the run), the progress bar's latest losses, the validation lines, and the
stop on a non-finite loss (training.on_nonfinite_loss: stop), looked for where the losses are read
anyway: once per log_interval steps, so that the steps never wait for the device."""
import numpy as np
import torch
import torch.distributed as dist


class NonFiniteLoss(Exception):
    """A loss turned NaN or infinite (training.on_nonfinite_loss: stop)."""


class Logbook:
    def __init__(self, networks, watched, placement, samples_per_step, on_nonfinite):
        self.networks, self.watched, self.placement = networks, watched, placement  # watched: Losses.watched
        self.samples_per_step, self.on_nonfinite = samples_per_step, on_nonfinite

    def shown_name(self, name):
        """How the progress bar names a network: a GAN's two by role ("generator "), a lone one
        not at all, since a classifier or a denoiser is no generator."""
        return f"{name} " if len(self.networks) > 1 else ""

    def record(self, run, bar, pending, epoch, steps_done, epoch_steps_done, waited, elapsed):
        """Move the pending steps' losses ([(terms, lrs, time)], the last of them step
        `steps_done`, the `epoch_steps_done`-th of its epoch) to the networks' loss_history and to
        metrics.jsonl (one device sync for them all), and show the latest losses and the share of
        the `elapsed` seconds of these steps spent waiting for data (`waited`). A step holds the
        terms of the networks it updated, and each the terms its loss gave at that step."""
        first_step, first_epoch_step = steps_done - len(pending) + 1, epoch_steps_done - len(pending) + 1
        speed = round(self.samples_per_step * len(pending) / elapsed, 1)  # the same for each of these steps
        keys = [(i, name, term) for i, (found, _, _) in enumerate(pending) for name, terms in found.items()
                for term in terms]
        values = torch.stack([pending[i][0][name][term] for i, name, term in keys]).cpu().tolist() if keys else []
        steps = [{} for _ in pending]  # [step] {network: {term: value}} ('total' first)
        for (i, name, term), value in zip(keys, values):
            steps[i].setdefault(name, {})[term] = value
        bad = self.first_nonfinite([[terms["total"] for terms in found.values()] for found in steps]) \
            if self.on_nonfinite == "stop" else None
        kept = len(pending) if bad is None else bad  # (the steps before a bad one are kept)
        rows = [{"epoch": epoch, "step": first_step + i, "time": round(stamp, 3), "samples_per_s": speed,
                 "data_wait": round(waited / elapsed, 4)} for i, (_, _, stamp) in enumerate(pending[:kept])]
        for row, found, (_, lrs, _) in zip(rows, steps, pending):
            for name, terms in found.items():
                history = self.networks[name].loss_history
                for term, value in terms.items():
                    history.setdefault(term, []).append(value)
                    row[f"{name}/{term}"] = value
                row[f"{name}/lr"] = lrs[name]
        run.log(rows)
        if bad is not None:
            net, terms = next((name, terms) for name, terms in steps[bad].items() if not np.isfinite(terms["total"]))
            where = where_nonfinite(epoch, first_step + bad, first_epoch_step + bad, net, terms)
            raise NonFiniteLoss(f"non-finite loss at {where}")
        shown = {f"{self.shown_name(name)}loss": f"{net.loss_history['total'][-1]:.4f}"
                 for name, net in self.networks.items() if net.loss_history.get("total")}
        shown |= {f"{self.shown_name(name)}{value}": f"{self.networks[name].loss_history[value][-1]:.4g}"
                  for name, values in self.watched.items() for value in values}  # (a flow's watched values)
        bar.set_postfix({**shown, "data wait": f"{waited / elapsed:.0%}"}, refresh=False)

    def first_nonfinite(self, totals):
        """The index of the first of the pending steps with a NaN or inf loss on any process
        (`totals`: [step][network] total loss, on the CPU), or None. The steps after a bad one
        change only weights that are never saved."""
        bad = next((i for i, row in enumerate(totals) if not all(map(np.isfinite, row))), len(totals))
        if self.placement.world_size > 1:  # the first on any process, so that all stop at the same step
            first = torch.tensor([bad], device=self.placement.device)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            bad = int(first.item())
        return bad if bad < len(totals) else None

    def validation(self, run, bar, epoch, step, means, quality):
        """Log a validation's means ({(network, term): mean}, the outputs' metrics among them) and
        show them, with the `quality` metrics apart."""
        run.log([{"epoch": epoch, "step": step,
                  **{f"validation/{name}/{term}": value for (name, term), value in means.items()}}])
        if self.placement.is_main:
            bar.write(f"epoch {epoch}: validation loss " + ", ".join(
                f"{self.shown_name(name)}{means[name, 'total']:.4f}" for name in self.networks)
                + "".join(f", {name} {value:.4g}" for name, value in quality.items()))


def nonfinite_message(error, last):
    """What a run stopped by a non-finite loss says (`last`: its newest checkpoint, or None)."""
    kept = f"The last checkpoint, {last}, is untouched." if last else "No checkpoint of this run was written."
    return (f"error: {error}\n{kept} To skip such updates instead, set training.on_nonfinite_loss: skip; a lower "
            "learning rate often helps.")


def where_nonfinite(epoch, step, epoch_step, net, terms):
    """Where a non-finite loss came, for messages: `epoch` the one being trained."""
    values = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
    return f"epoch {epoch}, step {step} ({epoch_step} of the epoch): {net} loss {values}"
