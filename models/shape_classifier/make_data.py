"""Make the shape classifier's data set: data/shape_classifier/shapes_16x16.npz.

    python models/shape_classifier/make_data.py

Each image is 16x16 grayscale and holds exactly one filled shape (circle, square or triangle:
labels 0, 1, 2, as in dataset_functions.SHAPE_KINDS) of random size, position and brightness on
a dark background, kept whole inside the frame. The drawing is dataset_functions.shapes', so
the U-Net example's images and these look alike. The images are stored clean, which keeps the
file at about 40 KiB (noise barely compresses); the training config adds fresh noise to every
batch instead.
The archive holds `images` (uint8, [N, 1, 16, 16], 0 black to 255 white) and `labels` (int64,
[N]). The same seed and size always give the same file contents.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository root, whatever folder this is run from
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dataset_functions import SHAPE_KINDS, _draw_shapes  # noqa: E402  (needs the root on sys.path)

OUT = ROOT / "data/shape_classifier/shapes_16x16.npz"
N_SAMPLES, SEED, SIZE = 3000, 0, 16
RADIUS = (0.12, 0.4)  # a shape's size as fractions of the image: 1.9 to 6.4 pixels; the smallest are hard to tell apart


def make(n_samples=N_SAMPLES, seed=SEED, size=SIZE):
    """(images uint8 [n, 1, size, size], labels int64 [n]) as numpy arrays, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    images, kinds = _draw_shapes(n_samples, generator, size, max_shapes=1, radius=RADIUS, inside=True)
    pixels = torch.round((images + 1) * 127.5).to(torch.uint8)  # [-1, 1] -> 0 to 255
    return pixels.numpy(), kinds[:, 0].to(torch.int64).numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_samples", type=int, default=N_SAMPLES)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write it (default: {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    images, labels = make(args.n_samples, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images, labels=labels)
    counts = ", ".join(f"{int((labels == k).sum())} {name}s" for k, name in enumerate(SHAPE_KINDS))
    print(f"wrote {args.out}: {len(labels)} images of {list(images.shape[1:])} ({counts}), "
          f"{args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
