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

from engine import config
from engine.errors import UserError
from engine.files import atomic_write

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
        """The metrics of metrics.jsonl rows written together (a log_interval's steps, or one
        validation) as one TensorBoard point each, on the last row's step: its mean over the rows
        that hold it (nulls left out). metrics.jsonl keeps every step; TensorBoard, which smooths
        its curves anyway, gets one event per log_interval steps, as the progress bar does. An
        event per step cost the toy GAN's 9 ms steps 1.4% of an epoch: TensorBoard checksums each
        one byte by byte in Python, in a thread that holds the GIL meanwhile."""
        sums, counts = {}, {}
        for row in rows:
            for key, value in row.items():
                if key not in BOOKKEEPING and isinstance(value, (int, float)) and not isinstance(value, bool):
                    sums[key], counts[key] = sums.get(key, 0.0) + value, counts.get(key, 0) + 1
                    self.last[key] = value
        if self.writer is not None and sums:
            summary = self.Summary(value=[self.Summary.Value(tag=key, simple_value=total / counts[key])
                                          for key, total in sums.items()])
            self.writer.file_writer.add_summary(summary, rows[-1]["step"], rows[-1].get("time"))

    def images(self, epoch, step, outputs, value_range=None, rows=None):
        """A grid of `outputs` (N x 1|3 x H x W, on the CPU) as the image "samples", or as
        samples_epoch<N>.png in the run's folder without TensorBoard, shown on `value_range`
        ((low, high): the target stream's declared range) or, without one, on the range their
        values snap to; with `rows` (names), a row each of N / len(rows) images, in that order.
        Outputs that are not images (a classifier's scores) are left out. Returns what was
        written, or None."""
        if outputs.dim() != 4 or outputs.shape[1] not in (1, 3):
            return None
        value_range = value_range or known_range(outputs)
        columns = len(outputs) // len(rows) if rows else grid_columns(len(outputs))
        grid = image_grid(to_unit_range(outputs, value_range), columns)
        if self.writer is not None:
            self.writer.add_image("samples", grid, step)
            return "samples"
        what = f"rows: {', '.join(rows)}" if rows else "outputs on fixed inputs"
        title = f"{what}, epoch {epoch} (step {step})\n{scale_note(outputs, value_range)}"
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


# The value ranges images usually come in, in the order they are tried: [0, 1] (floats, as
# torchvision reads them), [-1, 1] (a Tanh generator, data scaled with scale_to_symmetric) and
# [0, 255] (8-bit values read as they are).
IMAGE_RANGES = ((0.0, 1.0), (-1.0, 1.0), (0.0, 255.0))
MAX_COLUMNS = 16  # images per row at most: wider grids shrink each image below readability
PAD = (0.6, 0.72, 0.9)  # the pale blue between the images of a grid: no grey level reads as it


def known_range(x):
    """The range of IMAGE_RANGES that `x`'s values snap to, or None: the first that holds them all
    (give or take rounding), else the first they fill at least half of and overshoot by at most a
    quarter of its width on either side (noise added to data in [-1, 1]). [0, 255] only for whole
    numbers, which 8-bit data are and a network's outputs are not."""
    x = x.float()
    low, high = x.min().item(), x.max().item()
    whole = torch.equal(x, x.round())
    for share, fill in ((1e-4, 0.0), (0.25, 0.5)):
        for start, stop in IMAGE_RANGES:
            slack, width = share * (stop - start), stop - start
            if (low >= start - slack and high <= stop + slack and min(high, stop) - max(low, start) >= fill * width
                    and (stop != 255.0 or whole)):
                return start, stop
    return None


def to_unit_range(x, value_range="known"):
    """Values as an image viewer reads them, in [0, 1]: `value_range` (low, high) mapped onto
    [0, 1] and what lies outside it clipped, or, with None, stretched from the values' own
    min..max; "known": known_range(x)'s, else stretched."""
    x = x.float()
    value_range = known_range(x) if value_range == "known" else value_range
    if value_range is None:
        low, high = x.min().item(), x.max().item()
        return (x - low) / (high - low) if high > low else torch.zeros_like(x)
    low, high = value_range
    return ((x - low) / (high - low)).clamp(0, 1)


def scale_note(x, value_range):
    """What the grey levels of `x` mean, as a figure says it: the range it is shown on and how much
    of it is clipped, or its own min..max where it is stretched (to_unit_range)."""
    x = x.float()
    if value_range is None:
        return f"stretched: black {x.min().item():.3g}, white {x.max().item():.3g}"
    low, high = value_range
    outside = ((x < low) | (x > high)).float().mean().item()
    clipped = ("none clipped" if outside == 0 else "under 0.1% of values clipped" if outside < 0.001
               else f"{outside:.1%} of values clipped")
    return f"shown on [{low:g}, {high:g}], {clipped}"


def grid_columns(n, most=MAX_COLUMNS):
    """Images per row for a grid of n: about a square (ceil(sqrt(n))), at most `most`."""
    return max(1, min(most, math.ceil(math.sqrt(n))))


def image_grid(images, columns):
    """Images in [0, 1] (N x 1|3 x H x W) as one RGB grid, `columns` a row, 2 pixels apart on PAD."""
    from torchvision.utils import make_grid  # (slow to import; needed at epoch ends only)

    # -1 is no value of an image in [0, 1], so it marks the pad. (make_grid returns one image as it is.)
    grid = make_grid(images, nrow=columns, padding=2, pad_value=-1.0) if len(images) > 1 else \
        torch.nn.functional.pad(images[0], (2, 2, 2, 2), value=-1.0)
    grid = grid.expand(3, -1, -1).clone() if grid.shape[0] == 1 else grid
    pad = (grid == -1).all(0)
    grid[:, pad] = torch.tensor(PAD).unsqueeze(1)
    return grid


def save_png(path, grid, title):
    """The grid as a titled PNG, written atomically (files.atomic_write). The figure is sized to the
    grid, each image pixel a whole number of the PNG's pixels and the grid at least 400 wide (so
    that the title fits above it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = grid.permute(1, 2, 0).numpy()
    zoom = max(1, math.ceil(400 / image.shape[1]))  # a whole number: every image pixel the same size
    width, height = zoom * image.shape[1] / 100, zoom * image.shape[0] / 100  # inches at dpi 100
    fig, ax = plt.subplots(figsize=(width + 0.2, height + 0.2 + 0.18 * (title.count("\n") + 1)),
                           layout="constrained")
    ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(title, fontsize="small")
    ax.axis("off")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def flat_config(cfg):
    """config.flat_config with every value TensorBoard's hparams cannot take (lists, None, ...)
    as text: they take bool, int, float and str."""
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in config.flat_config(cfg).items()}
