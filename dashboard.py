"""The live view of a run: TensorBoard event files in the run's folder (optional), or, without
TensorBoard, the generator's sample grids as PNG files.

runs.Run owns one `Dashboard` while a run trains (rank 0 only) and hands it what it writes to
metrics.jsonl, so TensorBoard shows the same values on the same steps:
- `scalars(rows)`: every loss term, learning rate, samples/s, data wait and validation metric;
- `images(epoch, step, outputs)`: a grid of the generator's outputs on fixed inputs;
- `close()`: the run's flattened config and its last metrics, for TensorBoard's HParams tab.
tensorboard is imported only when a run uses it; the pipeline runs without it.
"""
import importlib.util
import math

import torch

import config
from errors import UserError

BOOKKEEPING = ("epoch", "step", "time", "nonfinite")  # row keys that are not metrics


def use_tensorboard(setting, where):
    """logging.tensorboard: true (required), false, or null (whenever the package is installed)."""
    installed = importlib.util.find_spec("tensorboard") is not None
    if setting and not installed:
        raise UserError(f"{where}.tensorboard: true, but the tensorboard package is not installed; "
                        "pip install tensorboard (or set it to null or false)")
    return installed if setting is None else setting


class Dashboard:
    def __init__(self, folder, tensorboard, cfg, resumed_at=0):
        self.folder, self.cfg, self.last = folder, cfg, {}
        self.writer = None
        if tensorboard:
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard import SummaryWriter

            self.Summary = Summary
            # A resumed run trains the steps after its checkpoint again (all of them, resumed from
            # epoch 0): purge_step drops their old events. The queue holds many log_intervals of
            # rows: at the default of 10 events, each burst of rows would wait in the training loop
            # for the writer's thread to catch up. Events reach the file every 15 s (TensorBoard
            # re-reads it about as often).
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=resumed_at + 1,
                                        max_queue=1000, flush_secs=15)

    def scalars(self, rows):
        """Every metric of metrics.jsonl rows as a scalar on its row's step (nulls left out).
        A row's scalars go out as one event (what add_scalar writes, one value each, at a ninth of
        the cost for nine of them); the writer queues it and writes it from its own thread."""
        for row in rows:
            metrics = {key: value for key, value in row.items()
                       if key not in BOOKKEEPING and isinstance(value, (int, float)) and not isinstance(value, bool)}
            self.last |= metrics
            if self.writer is not None and metrics:
                summary = self.Summary(value=[self.Summary.Value(tag=key, simple_value=value)
                                              for key, value in metrics.items()])
                self.writer.file_writer.add_summary(summary, row["step"], row.get("time"))

    def images(self, epoch, step, outputs):
        """A grid of `outputs` (N x 1|3 x H x W, on the CPU) as the image "samples", or as
        samples_epoch<N>.png in the run's folder without TensorBoard. Outputs that are not
        images (a classifier's scores) are left out. Returns what was written, or None."""
        if outputs.dim() != 4 or outputs.shape[1] not in (1, 3):
            return None
        from torchvision.utils import make_grid  # (slow to import; needed at epoch ends only)

        grid = make_grid(to_unit_range(outputs), nrow=max(1, math.isqrt(len(outputs))), padding=2, pad_value=1.0)
        if self.writer is not None:
            self.writer.add_image("samples", grid, step)
            return "samples"
        title = f"outputs on fixed inputs, epoch {epoch} (step {step})"
        return save_png(self.folder / f"samples_epoch{epoch}.png", grid, title)

    def close(self):
        """The run's hyperparameters and last metrics into its own event file, then close it.
        (SummaryWriter.add_hparams would write them into a new sub-folder, which TensorBoard shows
        as a separate run.)"""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        metrics = {key: value for key, value in self.last.items() if math.isfinite(value)}
        for summary in hparams(flat_config(self.cfg), metrics):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()
        self.writer = None


def to_unit_range(x):
    """Values as an image viewer reads them: [0, 1] as they are, [-1, 1] (tanh) shifted, anything
    else stretched from its min..max."""
    x = x.float()
    low, high = x.min().item(), x.max().item()
    if low >= 0 and high <= 1:
        return x
    if low >= -1 and high <= 1:
        return (x + 1) / 2
    return (x - low) / (high - low) if high > low else torch.zeros_like(x)


def save_png(path, grid, title):
    """The grid as a titled PNG, written atomically (runs.atomic_write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from runs import atomic_write

    image = grid.permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(max(3, image.shape[1] / 40), max(3, image.shape[0] / 40) + 0.4))
    ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(title, fontsize="small")
    ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def flat_config(cfg):
    """config.flat_config with every value TensorBoard's hparams cannot take (lists, None, ...)
    as text: they take bool, int, float and str."""
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in config.flat_config(cfg).items()}
