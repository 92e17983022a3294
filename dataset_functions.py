"""Functions a training config names in its `dataset` section. Add your own here.

Four kinds, each named by a key of a data stream in the config:
- file_reader(path, **file_reader_args) -> tensor: the samples of one file, stacked on dim 0
  (or one sample, for the folder read type without multiple_samples_per_file).
- data_generating_function(n_samples, generator, **args) -> tensor of n_samples samples.
- data_read_postprocessing_fn(data, **args) -> tensor: applied once to the whole stream.
- data_batch_transform(batch, generator, **args) -> tensor: applied to every batch; draw any
  randomness from `generator` so runs stay reproducible.
"""
import numpy as np
import torch
import torchvision.io


# ---- file readers ----
def read_npy(path, dtype="float32"):
    """A .npy array as a tensor."""
    return torch.from_numpy(np.load(path).astype(dtype))


def read_image(path, grayscale=False):
    """A PNG/JPEG image as a float tensor [C, H, W] in [0, 1]."""
    mode = torchvision.io.ImageReadMode.GRAY if grayscale else torchvision.io.ImageReadMode.RGB
    return torchvision.io.decode_image(torchvision.io.read_file(str(path)), mode=mode).float() / 255


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


def shapes(n_samples, generator, size=32, max_shapes=3):
    """size x size grayscale images in [-1, 1]: one to max_shapes filled circles, squares and
    triangles of random size, position and brightness on a dark background, later ones on top.

    The U-Net example's clean images (shipped as data/unet_gan/shapes_32x32.npy, seed 0, 1024
    samples, float16); its noisy inputs are the same images through add_fixed_noise.
    """
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = grid.view(1, size, 1), grid.view(1, 1, size)
    images = torch.full((n_samples, size, size), -1.0)

    def uniform(low, high):
        return low + (high - low) * torch.rand(n_samples, 1, 1, generator=generator)

    for i in range(max_shapes):
        kind = torch.randint(0, 3, (n_samples, 1, 1), generator=generator)
        present = torch.rand(n_samples, 1, 1, generator=generator) < (1.0 if i == 0 else 0.6)
        radius = uniform(0.12, 0.3) * size
        dy, dx = ys - uniform(0, size), xs - uniform(0, size)
        circle = dy ** 2 + dx ** 2 <= radius ** 2
        square = torch.maximum(dy.abs(), dx.abs()) <= 0.8 * radius
        triangle = (dy <= 0.7 * radius) & (dx.abs() <= 0.6 * (dy + radius))  # apex up, at dy = -radius
        mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)) & present
        images = torch.where(mask, uniform(-0.4, 1.0), images)
    return images.unsqueeze(1)


# ---- postprocessing ----
def scale_to_symmetric(data, low=0.0, high=1.0):
    """Map values from [low, high] to [-1, 1] (the range of a Tanh generator)."""
    return (data - low) / (high - low) * 2 - 1


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
            flip = torch.rand(batch.shape[0], generator=generator) < 0.5
            batch = torch.where(flip.view(-1, *[1] * (batch.dim() - 1)), batch.flip(dim), batch)
    return batch


def add_gaussian_noise(batch, generator, std=0.05):
    """Add N(0, std^2) noise to every value."""
    return batch + std * torch.randn(batch.shape, generator=generator)


def resample_normal(batch, generator):
    """Replace the batch with fresh standard normal noise of the same shape: a GAN's latent
    stream then gives new noise every step instead of cycling through a fixed set."""
    return torch.randn(batch.shape, generator=generator)
