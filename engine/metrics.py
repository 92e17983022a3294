"""How close a model's outputs are to their targets, the numbers papers report: top-1 (and
top-5) accuracy for class scores against class labels, PSNR and SSIM for images against paired
images. Validation computes them every epoch (validation.validation_means, logged as
validation/generator/<name>); evaluate.py computes them on the samples it evaluates.

Validation adds up per-batch sums on the device (no host sync per batch; one all-reduce under
DDP) and `finish` turns them into the metrics:
- accuracy: the share of samples whose highest score is their label; top5_accuracy (more than
  5 classes): the share whose label is among the five highest.
- psnr: 10 log10(peak^2 / MSE) in dB, the MSE over every value of every sample, the peak the
  width of the target stream's range ([-1, 1]: 2; [0, 1]: 1; [0, 255]: 255; dataset_base.value_range).
- ssim: the mean structural similarity of each output to its target (torchmetrics, where
  installed; a Gaussian window of 11 pixels, or the largest odd size the images allow).
Both clamp the outputs to that range first, as an image written to a file would be: an output
beyond the range scores as the nearest value in it, never as a wider range. Without a known
range they are not computed (names_of leaves them out).
"""
import importlib.util
import math

import torch

SSIM_WINDOW = 11  # torchmetrics' (and the SSIM paper's) Gaussian window


def kind_of(output_shape, targets, paired):
    """'classes' for class scores [C] per sample against integer labels, 'images' for outputs
    [C, H, W] shaped like paired targets, else None. `output_shape`: one output's shape;
    `targets`: a batch of targets (or None)."""
    if targets is None or not paired:
        return None
    integer = not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool
    if len(output_shape) == 1 and targets.dim() == 1 and integer:
        return "classes"
    if len(output_shape) == 3 and list(targets.shape[1:]) == list(output_shape):
        return "images"
    return None


def names_of(kind, output_shape, value_range=None):
    """The metrics of a kind, as finish() names them; images' only with a known `value_range`
    (dataset_base.ValueRange of the targets)."""
    if kind == "classes":
        return ["accuracy", "top5_accuracy"] if output_shape[0] > 5 else ["accuracy"]
    if kind == "images" and value_range is not None and value_range.known:
        return ["psnr", "ssim"] if ssim_window(output_shape) else ["psnr"]
    return []


def ssim_window(output_shape):
    """The SSIM window for images of this shape (0: none; needs torchmetrics and 3+ pixels a side)."""
    side = min(output_shape[-2:])
    if side < 3 or importlib.util.find_spec("torchmetrics") is None:
        return 0
    return min(SSIM_WINDOW, side if side % 2 else side - 1)


def batch_sums(kind, outputs, targets, value_range=None, clamp=True):
    """{name: a 0-d tensor to add up over batches} for one batch; `finish` divides. Images: the
    outputs clamped to `value_range` (low, high), the targets' range (clamp False: as they are,
    for evaluate.py's inputs, which are data and not a model's answer)."""
    outputs = outputs.detach().float()
    n = torch.tensor(float(len(outputs)), device=outputs.device)
    if kind == "classes":
        top = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
        hits = top == targets.view(-1, 1)
        sums = {"n": n, "accuracy": hits[:, 0].sum().float()}
        if outputs.shape[1] > 5:
            sums["top5_accuracy"] = hits.any(1).sum().float()
        return sums
    targets, (low, high) = targets.float(), value_range[:2]
    outputs, peak = outputs.clamp(low, high) if clamp else outputs, high - low
    sums = {"n": n, "squared_error": ((outputs - targets) ** 2).sum(), "values": n * outputs[0].numel()}
    window = ssim_window(outputs.shape) if outputs.dim() == 4 else 0
    if window:
        from torchmetrics.functional.image import structural_similarity_index_measure

        # torchmetrics sizes its Gaussian window from sigma (1.5 for 11 pixels): scale it down with the window
        per_image = structural_similarity_index_measure(outputs, targets, data_range=peak, reduction="none",
                                                        sigma=1.5 * window / SSIM_WINDOW)
        sums["ssim"] = per_image.sum()
    return sums


def finish(sums, value_range=None):
    """The metrics of summed batch_sums ({name: float})."""
    n = sums["n"]
    if "squared_error" not in sums:
        return {name: value / n for name, value in sums.items() if name != "n"}
    result = {"psnr": psnr(sums["squared_error"] / sums["values"], value_range[1] - value_range[0])}
    if "ssim" in sums:
        result["ssim"] = sums["ssim"] / n
    return result


def psnr(mse, peak):
    """Peak signal-to-noise ratio in dB (inf for identical images, -inf for an infinite MSE, NaN for
    one of NaN: never a finite number for images that hold none)."""
    return math.inf if mse == 0 else 10 * (2 * math.log10(peak) - math.log10(mse))
