"""Functions a training config names in its `dataset` section. Add your own here.

Four kinds, each named by a key of a data stream in the config:
- file_reader(path, **file_reader_args) -> tensor: the samples of one file, stacked on dim 0
  (or one sample, for the folder read type without multiple_samples_per_file).
- data_generating_function(n_samples, generator, **args) -> tensor of n_samples samples.
- data_read_postprocessing_fn(data, **args) -> tensor: applied once to the whole stream (a
  config may list several, applied in order).
- batch transform(batch, generator, **args) -> tensor (its first parameter named `batch`):
  applied to every training batch, named by a stream's data_batch_transform or by an entry of
  dataset.batch_transforms. Draw all randomness from `generator`, and let how much you draw
  depend on the batch size alone (one flip per sample, say): an entry that lists several
  streams gives each the same generator state, so sample i of each is flipped, cropped or
  shifted alike. With dataset.on_device the batch and the generator are on the GPU: create
  tensors with device=batch.device, as the functions here do.

The range of the values a function makes: PSNR and SSIM measure against it (its width is the
peak; outputs are clamped to it), and pictures and Inception's features show images on it.
Declare it after the function, as the ones here do:
    fn.value_range = (-1.0, 1.0)
or, where it depends on the arguments, as a function of them (every argument, the defaults
filled in) that gives the range or None where it is not known:
    fn.value_range = lambda dtype, **args: (0.0, 255.0) if dtype == "uint8" else (0.0, 1.0)
A function without one keeps the range it was given (a flip, a crop, a resize, added noise);
one that changes values in a way no range describes declares `fn.value_range = None`
(normalize). A stream's range is the last one declared along the chain that makes it: its
file_reader or data_generating_function, its data_read_postprocessing_fn in order, then the
dataset.batch_transforms entries with in_evaluation: true that list it. A stream's own
`value_range: [low, high]` key overrides them all (dataset_base.value_range reads them).
"""
import numpy as np
import torch
import torchvision.io
from torchvision.transforms.v2 import functional as TF


# ---- file readers ----
def read_npy(path, dtype="float32"):
    """A .npy array as a tensor."""
    array = np.load(path)
    if not isinstance(array, np.ndarray):
        array.close()
        raise ValueError("it is a .npz archive of several arrays; read it with read_npz and its key")
    return torch.from_numpy(array).to(torch_dtype(dtype))


def read_npz(path, key, dtype="float32"):
    """The array named `key` in a .npz archive (np.savez or np.savez_compressed) as a tensor."""
    archive = np.load(path)
    if isinstance(archive, np.ndarray):
        raise ValueError("it is a single .npy array; read it with read_npy")
    with archive:
        if key not in archive.files:
            raise ValueError(f"no array {key!r} in it; it has: {', '.join(archive.files)}")
        return torch.from_numpy(archive[key]).to(torch_dtype(dtype))


def read_image(path, grayscale=False, size=None, crop=None, dtype="float32"):
    """A PNG, JPEG, WebP or GIF image as a tensor [C, H, W]: 1 channel if grayscale, else 3
    (RGB; alpha and palettes are converted). `size` resizes it first (an int: the shorter side,
    keeping the aspect ratio; [h, w]: exactly), then `crop` cuts out the centre ([h, w] or an
    int for a square). Float values are in [0, 1]; dtype uint8 keeps 8-bit images' bytes (4x
    less memory than float32; 16-bit PNGs are scaled down to it).
    """
    # torchvision 0.29 deprecates its image decoders in favour of TorchCodec; while they exist
    # they need no extra package, and this reader is the one place to change when they go.
    mode = torchvision.io.ImageReadMode.GRAY if grayscale else torchvision.io.ImageReadMode.RGB
    image = torchvision.io.decode_image(torchvision.io.read_file(str(path)), mode=mode)
    if size is not None:
        image = TF.resize(image, size, antialias=True)
    if crop is not None:
        image = TF.center_crop(image, crop)
    if dtype == "uint8":
        return TF.to_dtype(image, torch.uint8, scale=True)  # a no-op for 8-bit images
    return image.to(torch_dtype(dtype)) / torch.iinfo(image.dtype).max  # 255, or 65535 for 16-bit PNGs


read_image.value_range = lambda dtype, **args: (
    (0.0, 255.0) if torch_dtype(dtype) == torch.uint8 else (0.0, 1.0) if torch_dtype(dtype).is_floating_point else None)


def torch_dtype(name):
    """torch's dtype of a name such as float32 or int64 (a reader's `dtype` argument)."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype; e.g. float32, float16, uint8, int64")
    return dtype


# ---- data generating functions ----
def random_normal(n_samples, generator, shape=(1, 4, 4)):
    """Standard normal noise, e.g. a GAN generator's input."""
    return torch.randn((n_samples, *shape), generator=generator)


def blobs(n_samples, generator, size=4, width=0.8):
    """size x size images in [-1, 1] of one bright Gaussian spot at a random (continuous) position.

    The toy GAN's data (shipped as data/example_model/blobs_4x4.npy): learnable in seconds, and
    structured enough that learning shows: a sample is a spot, and the spots cover the image.
    """
    centres = torch.rand(n_samples, 2, 1, 1, generator=generator) * (size - 1)
    grid = torch.arange(size, dtype=torch.float32)
    squared = (grid.view(1, size, 1) - centres[:, 0]) ** 2 + (grid.view(1, 1, size) - centres[:, 1]) ** 2
    return (2 * torch.exp(-squared / (2 * width ** 2)) - 1).unsqueeze(1)


blobs.value_range = (-1.0, 1.0)


def shapes(n_samples, generator, size=32, max_shapes=3):
    """size x size grayscale images in [-1, 1]: one to max_shapes filled circles, squares and
    triangles of random size, position and brightness on a dark background, later ones on top.

    The U-Net example's clean images (shipped as data/unet_gan/shapes_32x32.npy, seed 0, 1024
    samples, float16); its noisy inputs are the same images through add_gaussian_noise.
    """
    return _draw_shapes(n_samples, generator, size, max_shapes)[0]


shapes.value_range = (-1.0, 1.0)


SHAPE_KINDS = ("circle", "square", "triangle")  # what _draw_shapes' kind numbers 0, 1, 2 stand for


def _draw_shapes(n_samples, generator, size, max_shapes, radius=(0.12, 0.3), inside=False):
    """(images [n, 1, size, size] in [-1, 1], kinds [n, max_shapes]): the drawing behind shapes().

    kinds[i, j] is the SHAPE_KINDS index of image i's j-th shape, or -1 where that shape was left
    out (the first is always drawn). radius is the range of a shape's size as fractions of
    `size`; with inside, a shape's centre keeps at least its radius from the border, so that the
    shape is whole (a circle or square entirely; a triangle's tips may graze the edge). The
    defaults are shapes' own, and draw exactly the same random numbers in the same order.
    """
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = grid.view(1, size, 1), grid.view(1, 1, size)
    images = torch.full((n_samples, size, size), -1.0)
    kinds = []

    def uniform(low, high):
        return low + (high - low) * torch.rand(n_samples, 1, 1, generator=generator)

    for i in range(max_shapes):
        kind = torch.randint(0, 3, (n_samples, 1, 1), generator=generator)
        present = torch.rand(n_samples, 1, 1, generator=generator) < (1.0 if i == 0 else 0.6)
        r = uniform(radius[0], radius[1]) * size
        if inside:
            dy, dx = ys - uniform(r, size - r), xs - uniform(r, size - r)
        else:
            dy, dx = ys - uniform(0, size), xs - uniform(0, size)
        circle = dy ** 2 + dx ** 2 <= r ** 2
        square = torch.maximum(dy.abs(), dx.abs()) <= 0.8 * r
        triangle = (dy <= 0.7 * r) & (dx.abs() <= 0.6 * (dy + r))  # apex up, at dy = -r
        mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)) & present
        images = torch.where(mask, uniform(-0.4, 1.0), images)
        kinds.append(torch.where(present, kind, -1).view(n_samples))
    return images.unsqueeze(1), torch.stack(kinds, 1)


# ---- postprocessing ----
def scale_to_symmetric(data, low=0.0, high=1.0):
    """Map values from [low, high] to [-1, 1] (the range of a Tanh generator)."""
    return (data - low) / (high - low) * 2 - 1


scale_to_symmetric.value_range = (-1.0, 1.0)


def to_images(data, size=None, channels=None, mode="bilinear"):
    """Array data as the images a model takes, [N, C, H, W] float: a channel axis added to
    [N, H, W] data, one channel repeated to `channels` (3 for a network made for RGB), and the
    images resized to `size` ([h, w], or an int for a square) by `mode`: bilinear or bicubic
    (antialiased when shrinking), or nearest (for masks and label maps, keeps their values).
    E.g. 8x8 digits for a 32x32 model: to_images with {size: 32}."""
    modes = ("bilinear", "bicubic", "nearest")
    if mode not in modes:
        raise ValueError(f"mode {mode!r}: use one of {', '.join(modes)}")
    if data.dim() == 3:
        data = data.unsqueeze(1)
    if data.dim() != 4:
        raise ValueError(f"expects samples [N, H, W] or [N, C, H, W], got {list(data.shape)}")
    data = data.float()
    if channels is not None and channels != data.shape[1]:
        if data.shape[1] != 1:
            raise ValueError(f"channels {channels}: only a single channel is repeated; the data has {data.shape[1]}")
        data = data.expand(-1, channels, -1, -1)
    if size is not None:
        size = [size, size] if isinstance(size, int) else list(size)
        smooth = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
        data = torch.nn.functional.interpolate(data, size=size, mode=mode, **smooth)
    return data


def add_fixed_noise(data, std=0.5, seed=0):
    """Add N(0, std^2) noise drawn once from `seed`: a fixed noisy copy of clean data (the U-Net
    example's denoising inputs), the same in every epoch and in evaluation."""
    generator = torch.Generator().manual_seed(seed)
    return data + std * torch.randn(data.shape, generator=generator)


# ---- batch transforms ----
def random_flip(batch, generator, horizontal=True, vertical=False):
    """Flip each sample left-right (and/or up-down) with probability 1/2."""
    for dim, enabled in ((-1, horizontal), (-2, vertical)):
        if enabled:
            flip = torch.rand(batch.shape[0], generator=generator, device=batch.device) < 0.5
            batch = torch.where(flip.view(-1, *[1] * (batch.dim() - 1)), batch.flip(dim), batch)
    return batch


def random_crop(batch, generator, size):
    """A size x size window (or [h, w]) at a random position in each sample of [N, ..., H, W]."""
    h, w = (size, size) if isinstance(size, int) else size
    height, width = batch.shape[-2:]
    if h > height or w > width:
        raise ValueError(f"crop size {[h, w]} is larger than the samples' {[height, width]}")
    n = batch.shape[0]
    top = torch.randint(0, height - h + 1, (n, 1), generator=generator, device=batch.device) + \
        torch.arange(h, device=batch.device)
    left = torch.randint(0, width - w + 1, (n, 1), generator=generator, device=batch.device) + \
        torch.arange(w, device=batch.device)
    # Gather rows, then columns, per sample: one indexing op for the whole batch.
    lead = [1] * (batch.dim() - 3)
    rows = top.view(n, *lead, h, 1).expand(*batch.shape[:-2], h, width)
    batch = batch.gather(-2, rows)
    cols = left.view(n, *lead, 1, w).expand(*batch.shape[:-1], w)
    return batch.gather(-1, cols)


def normalize(batch, generator, mean, std):
    """(x - mean) / std per channel (dim 1); mean and std are numbers or one per channel."""
    shape = (1, -1, *[1] * (batch.dim() - 2))
    mean = torch.as_tensor(mean, dtype=batch.dtype, device=batch.device).reshape(shape)
    std = torch.as_tensor(std, dtype=batch.dtype, device=batch.device).reshape(shape)
    return (batch - mean) / std


normalize.value_range = None  # one range per channel at best: guessed from the values, or declared on the stream


def to_float(batch, generator, scale=255.0):
    """uint8 samples (read_image with dtype uint8) as float32 in [0, 1]."""
    return batch.float() / scale


to_float.value_range = lambda scale, **args: (0.0, 255.0 / scale)  # [0, 1] for 8-bit values


def add_gaussian_noise(batch, generator, std=0.05):
    """Add N(0, std^2) noise to every value."""
    return batch + std * torch.randn(batch.shape, generator=generator, device=batch.device)


def resample_normal(batch, generator):
    """Replace the batch with fresh standard normal noise of the same shape: a GAN's latent
    stream then gives new noise every step instead of cycling through a fixed set."""
    return torch.randn(batch.shape, generator=generator, device=batch.device)
