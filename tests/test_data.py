"""Data streams users rely on: the readers and read types, n_inputs / randomize_inputs,
postprocessing, the training/validation split, batch transforms that keep paired streams aligned,
the Dataset and its loaders (the same batches with or without worker processes), the config's
dataset keys, and the validation pass during training.

Everything runs in-process on small data the tests write to tmp_path, except one train.py run
(a corrupt image must be a clean user error, exit status 2, before anything is written).
"""
import importlib.util
import json
import os
import struct
import sys
import types
import zlib

import numpy as np
import pytest
import torch
import torchvision.io

import dataset
import dataset_base
import dataset_functions
import train
from conftest import ARCH_YAML, CHECKPOINTS, FLOW_PY, SRC, TRAIN_CFG, run
from engine import cli, config, loop, model_base, runs
from engine.errors import UserError
from engine.network import step_epoch_schedules
from engine.placement import Placement, seed_everything

# torchvision.io (used by read_image and to write the test's PNGs) warns that it is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

UNET_CFG = SRC / "configs/unet_gan/unet_gan_training_cfg.yaml"
UNET_MODEL = {"architecture_cfg_path": "models/unet_gan/unet_gan_architecture.yaml",
              "model_flow_path": "models/unet_gan/unet_gan.py"}
EXAMPLE_MODEL = {"architecture_cfg_path": ARCH_YAML, "model_flow_path": FLOW_PY}
CPU = Placement(torch.device("cpu"))
# A stream the config checks accept; tests that build datasets from their own tensors use it to
# validate the dataset section (only its name and data_batch_transform matter then).
ANY_STREAM = {"data_read_type": "function", "data_generating_function": "blobs", "n_inputs": 1}


def streams_cfg(streams, len_key=None, **fixed):
    """A validated dataset section for `streams` ({name: raw stream config}) and the section's
    own keys (`fixed`); UserError if invalid."""
    errors = []
    raw = {"data_len_key": len_key or next(iter(streams)), **fixed, **streams}
    out = config.check_dataset(raw, "dataset", errors)
    config.raise_if(errors, "test config")
    return out


def transforms_cfg(names, *entries, **fixed):
    """A validated dataset section with streams `names` and these batch_transforms entries."""
    return streams_cfg({name: dict(ANY_STREAM) for name in names}, batch_transforms=list(entries), **fixed)


def entry(transform, streams, in_evaluation=False, **args):
    return {"transform": transform, "args": args, "streams": streams, "in_evaluation": in_evaluation}


def load(streams, seed=0, len_key=None):
    return dataset_base.load_streams(streams_cfg(streams, len_key), seed, "test config")


def whole_batch(ds, seed=0):
    """Every sample of `ds` as one batch whose random draws come from `seed`."""
    return ds.__getitems__((seed, torch.arange(len(ds))))


def file_stream(path, reader="read_npy", **more):
    return {"data_read_type": "file", "data_path": str(path), "file_reader": reader, **more}


@pytest.fixture
def npy(tmp_path):
    data = np.arange(20 * 2 * 3 * 3, dtype=np.float64).reshape(20, 2, 3, 3)
    path = tmp_path / "data.npy"
    np.save(path, data)
    return path, data


# ---- readers -----------------------------------------------------------------------------------
def random_image(shape=(3, 8, 12), seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_read_image_png_uint8_keeps_the_exact_bytes_and_float32_is_in_unit_range(tmp_path):
    image = random_image()
    path = tmp_path / "rgb.png"
    torchvision.io.write_png(image, str(path))
    as_bytes = dataset_functions.read_image(path, dtype="uint8")
    assert as_bytes.dtype == torch.uint8 and torch.equal(as_bytes, image)
    as_float = dataset_functions.read_image(path)
    assert as_float.dtype == torch.float32 and as_float.shape == (3, 8, 12)
    assert torch.equal(as_float, image.float() / 255)
    assert as_float.min() >= 0 and as_float.max() <= 1


def test_read_image_grayscale_from_an_rgb_file_is_its_luminance(tmp_path):
    image = random_image()
    path = tmp_path / "rgb.png"
    torchvision.io.write_png(image, str(path))
    gray = dataset_functions.read_image(path, grayscale=True, dtype="uint8")
    assert gray.shape == (1, 8, 12)
    r, g, b = image.float()
    luma = 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R 601, as libpng and PIL convert
    assert (gray[0].float() - luma).abs().max() <= 2


def write_png(path, pixels, color_type, bit_depth=8, palette=None):
    """A PNG of the kinds torchvision does not write (alpha, palette, 16 bits): `pixels` an array
    [H, W] or [H, W, channels] of uint8 (big-endian uint16 for 16 bits), `color_type` as the PNG
    standard numbers it (0 gray, 2 RGB, 3 palette, 6 RGBA)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + (chunk(b"PLTE", palette.tobytes()) if palette is not None else b"")
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def as_chw(pixels):
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


def test_read_image_rgba_palette_and_gray_pngs_come_out_with_3_channels(tmp_path):
    path = tmp_path / "image.png"
    rgba = random_image((8, 12, 4), seed=1).numpy()
    write_png(path, rgba, color_type=6)
    assert dataset_functions.read_image(path, dtype="uint8").shape == (3, 8, 12)
    rgba[..., 3] = 255  # opaque: the colour channels come out exactly
    write_png(path, rgba, color_type=6)
    assert torch.equal(dataset_functions.read_image(path, dtype="uint8"), as_chw(rgba[..., :3]))
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    indices = np.random.default_rng(0).integers(0, 4, (8, 12), dtype=np.uint8)
    write_png(path, indices, color_type=3, palette=palette)
    assert torch.equal(dataset_functions.read_image(path, dtype="uint8"), as_chw(palette[indices]))
    gray = np.random.default_rng(1).integers(0, 256, (8, 12), dtype=np.uint8)
    write_png(path, gray, color_type=0)
    assert torch.equal(dataset_functions.read_image(path, dtype="uint8"), torch.from_numpy(gray).expand(3, 8, 12))


def test_read_image_16_bit_png_as_float32_is_in_unit_range(tmp_path):
    """16-bit PNGs (scientific images, depth maps) come out as float32 in [0, 1] like 8-bit ones."""
    pixels = np.random.default_rng(0).integers(0, 2**16, (8, 12, 3)).astype(">u2")
    path = tmp_path / "deep.png"
    write_png(path, pixels, color_type=2, bit_depth=16)
    out = dataset_functions.read_image(path)
    assert out.dtype == torch.float32 and out.shape == (3, 8, 12)
    assert 0 <= out.min() and out.max() <= 1, f"values in [{out.min():.3f}, {out.max():.3f}]"
    expected = torch.from_numpy(pixels.astype(np.float32) / 65535).permute(2, 0, 1)
    assert (out - expected).abs().max() <= 1 / 255


def test_read_image_jpeg_rgb_and_grayscale(tmp_path):
    smooth = (torch.linspace(0, 255, 12).view(1, 1, 12) * torch.ones(3, 8, 1)).to(torch.uint8)
    smooth[1] = 128
    path = tmp_path / "photo.jpg"
    torchvision.io.write_jpeg(smooth, str(path), quality=95)
    rgb = dataset_functions.read_image(path)
    assert rgb.shape == (3, 8, 12) and rgb.dtype == torch.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    assert (rgb - smooth.float() / 255).abs().mean() < 0.02  # lossy, but the same picture
    assert dataset_functions.read_image(path, grayscale=True).shape == (1, 8, 12)


def test_read_image_size_and_centre_crop(tmp_path):
    image = random_image()  # [3, 8, 12]
    path = tmp_path / "rgb.png"
    torchvision.io.write_png(image, str(path))
    read = dataset_functions.read_image
    assert read(path, size=4).shape == (3, 4, 6)               # int: the shorter side, aspect ratio kept
    assert read(path, size=[5, 7]).shape == (3, 5, 7)          # [h, w]: exactly
    assert torch.equal(read(path, crop=[4, 6], dtype="uint8"), image[:, 2:6, 3:9])  # the centre
    assert torch.equal(read(path, crop=4, dtype="uint8"), image[:, 2:6, 4:8])       # int: a square
    assert read(path, size=6, crop=4).shape == (3, 4, 4)       # resize first, then crop
    flat = torch.tensor([10, 100, 200], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 12).contiguous()
    torchvision.io.write_png(flat, str(path))
    assert torch.equal(read(path, size=[4, 5], dtype="uint8"), flat[:, :4, :5])  # resizing keeps the colour


@pytest.fixture
def pngs(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8, generator=gen) for _ in range(3)]
    for name, image in zip(["b.png", "a.png", "c.png"], images):
        torchvision.io.write_png(image, str(folder / name))
    (folder / ".hidden").write_text("not an image")
    by_name = [images[1], images[0], images[2]]  # a, b, c
    return folder, by_name


def test_folder_read_type_with_images(pngs):
    folder, images = pngs
    out = load({"s": {"data_read_type": "folder", "data_path": str(folder), "file_reader": "read_image"}})["s"]
    assert out.shape == (3, 3, 5, 6)
    assert torch.equal(out, torch.stack(images).float() / 255)  # in file-name order, hidden files skipped
    gray = load({"s": {"data_read_type": "folder", "data_path": str(folder), "file_reader": "read_image",
                       "file_reader_args": {"grayscale": True, "dtype": "uint8"}}})["s"]
    assert gray.shape == (3, 1, 5, 6) and gray.dtype == torch.uint8


def test_file_read_type(npy):
    path, data = npy
    out = load({"s": file_stream(path)})["s"]
    assert out.dtype == torch.float32 and out.shape == (20, 2, 3, 3)
    assert torch.equal(out, torch.from_numpy(data).float())


def test_file_reader_args(npy):
    path, data = npy
    out = load({"s": file_stream(path, file_reader_args={"dtype": "float64"})})["s"]
    assert out.dtype == torch.float64 and torch.equal(out, torch.from_numpy(data))


@pytest.fixture
def npz(tmp_path):
    path = tmp_path / "arrays.npz"
    images, labels = np.arange(24, dtype=np.float64).reshape(6, 1, 2, 2), np.arange(6)
    np.savez_compressed(path, images=images, labels=labels)
    return path, images


def test_read_npz_reads_the_named_array(npz):
    path, images = npz
    out = load({"s": file_stream(path, "read_npz", file_reader_args={"key": "images"})})["s"]
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(images).float())


def test_read_npz_missing_key_names_the_file_and_lists_its_keys(npz):
    path, _ = npz
    with pytest.raises(UserError) as e:
        load({"s": file_stream(path, "read_npz", file_reader_args={"key": "imgs"})})
    message = str(e.value)
    assert "dataset.s" in message and str(path) in message and "'imgs'" in message
    assert "images" in message and "labels" in message


def test_read_npz_without_key_is_a_config_error(npz):
    path, _ = npz
    with pytest.raises(UserError, match=r"dataset\.s\.file_reader_args: read_npz needs key"):
        streams_cfg({"s": file_stream(path, "read_npz")})


def write_wrong_files(tmp_path):
    """{kind: file} of files that the readers below cannot parse."""
    np.save(tmp_path / "array.npy", np.zeros((2, 3), np.float32))
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    png = tmp_path / "image.png"
    torchvision.io.write_png(random_image(), str(png))
    (tmp_path / "truncated.png").write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])
    (tmp_path / "random.png").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)))
    return {"npy": tmp_path / "array.npy", "npz": tmp_path / "arrays.npz", "png": png,
            "truncated png": tmp_path / "truncated.png", "random bytes png": tmp_path / "random.png"}


@pytest.mark.parametrize("reader, args, kind", [
    ("read_image", {}, "truncated png"),
    ("read_image", {}, "random bytes png"),
    ("read_image", {}, "npy"),
    ("read_npy", {}, "png"),
    ("read_npy", {}, "npz"),           # a .npz given to the .npy reader
    ("read_npz", {"key": "a"}, "npy"),  # a .npy given to the .npz reader
])
def test_a_file_the_reader_cannot_parse_is_a_user_error_naming_it(tmp_path, reader, args, kind):
    path = write_wrong_files(tmp_path)[kind]
    with pytest.raises(UserError) as e:
        load({"s": file_stream(path, reader, file_reader_args=args)})
    assert str(path) in str(e.value) and "dataset.s" in str(e.value)


def test_corrupt_image_in_a_folder_is_a_user_error_naming_it(pngs):
    folder, _ = pngs
    bad = folder / "b2.png"
    bad.write_bytes((folder / "a.png").read_bytes()[:40])
    with pytest.raises(UserError) as e:
        load({"s": {"data_read_type": "folder", "data_path": str(folder), "file_reader": "read_image"}})
    assert str(bad) in str(e.value)


def test_folder_with_several_samples_per_file(tmp_path):
    folder = tmp_path / "stacks"
    folder.mkdir()
    stacks = [np.full((n, 1, 2, 2), i, dtype=np.float32) for i, n in enumerate([4, 2, 3])]
    for i, stack in enumerate(stacks):
        np.save(folder / f"part{i}.npy", stack)
    out = load({"s": {"data_read_type": "folder", "data_path": str(folder), "file_reader": "read_npy",
                      "multiple_samples_per_file": True}})["s"]
    assert out.shape == (9, 1, 2, 2)
    assert torch.equal(out, torch.from_numpy(np.concatenate(stacks)))


def test_folder_files_of_different_shapes_are_user_error(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((1, 2, 2), np.float32))
    np.save(folder / "b.npy", np.zeros((1, 3, 3), np.float32))
    with pytest.raises(UserError, match="different shapes"):
        load({"s": {"data_read_type": "folder", "data_path": str(folder), "file_reader": "read_npy"}})


def test_empty_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match=r"dataset\.s\.data_path"):
        load({"s": {"data_read_type": "folder", "data_path": str(tmp_path), "file_reader": "read_npy"}})


def test_folder_read_type_on_a_file_is_user_error(npy):
    path, _ = npy
    with pytest.raises(UserError, match=r"dataset\.s\.data_path"):
        load({"s": {"data_read_type": "folder", "data_path": str(path), "file_reader": "read_npy"}})


def test_unreadable_file_is_user_error(tmp_path):
    path = tmp_path / "not.npy"
    path.write_text("hello")
    with pytest.raises(UserError, match="not.npy"):
        load({"s": file_stream(path)})


def test_h5_read_type(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "data.h5"
    stream = {"data_read_type": "h5", "data_path": str(path), "h5_key": "images"}
    data = np.arange(24, dtype=np.float32).reshape(6, 1, 2, 2)
    with h5py.File(path, "w") as f:
        f["images"] = data
        f["labels"] = np.arange(6)
    assert torch.equal(load({"s": stream})["s"], torch.from_numpy(data))
    assert torch.equal(load({"s": dict(stream, n_inputs=4)})["s"], torch.from_numpy(data[:4]))
    with pytest.raises(UserError, match=r"dataset\.s\.h5_key.*'imgs'.*images, labels"):
        load({"s": dict(stream, h5_key="imgs")})


def test_h5_without_h5py_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "data.h5"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` raises ImportError
    with pytest.raises(UserError) as e:
        load({"s": {"data_read_type": "h5", "data_path": str(path), "h5_key": "images"}})
    assert "h5py" in str(e.value) and "pip" in str(e.value) and "dataset.s" in str(e.value)


def test_a_file_that_is_not_hdf5_is_a_user_error_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "data.h5"
    path.write_bytes(b"this is not an HDF5 file")
    if importlib.util.find_spec("h5py") is None:  # what h5py does with such a file: OSError (signature not found)
        fake = types.ModuleType("h5py")

        def File(name, mode="r"):
            raise OSError(f"Unable to synchronously open file (file signature not found): name = '{name}'")
        fake.File = File
        monkeypatch.setitem(sys.modules, "h5py", fake)
    with pytest.raises(UserError) as e:
        load({"s": {"data_read_type": "h5", "data_path": str(path), "h5_key": "images"}})
    assert str(path) in str(e.value)


def test_function_read_type():
    cfg = {"s": {"data_read_type": "function", "data_generating_function": "random_normal", "n_inputs": 7,
                 "data_generating_function_args": {"shape": [2, 3]}},
           "b": {"data_read_type": "function", "data_generating_function": "blobs", "n_inputs": 5},
           "t": {"data_read_type": "function", "data_generating_function": "random_normal", "n_inputs": 7,
                 "data_generating_function_args": {"shape": [2, 3]}}}
    first, again, other = load(cfg, seed=0), load(cfg, seed=0), load(cfg, seed=1)
    assert first["s"].shape == (7, 2, 3) and first["b"].shape == (5, 1, 4, 4)
    assert first["b"].min() >= -1 and first["b"].max() <= 1
    assert torch.equal(first["s"], again["s"]) and torch.equal(first["b"], again["b"])
    assert not torch.equal(first["s"], other["s"])
    assert not torch.equal(first["s"], first["t"])  # each stream draws its own numbers


def test_function_read_type_needs_n_inputs():
    with pytest.raises(UserError, match=r"dataset\.s\.n_inputs"):
        load({"s": {"data_read_type": "function", "data_generating_function": "random_normal"}})


def test_n_inputs_takes_the_first_samples(npy):
    path, data = npy
    out = load({"s": file_stream(path, n_inputs=6)})["s"]
    assert torch.equal(out, torch.from_numpy(data[:6]).float())


def test_randomize_inputs_is_seeded_by_split_seed_alike_for_paired_streams(npy):
    """A random choice of n_inputs samples is fixed by dataset.split_seed, not training.seed, and
    is the same for streams of equal length: inputs and their targets stay paired."""
    path, data = npy
    streams = {name: file_stream(path, n_inputs=6, randomize_inputs=True) for name in ("inputs", "targets")}

    def pick(split_seed, training_seed=0):
        cfg = streams_cfg(streams, split_seed=split_seed)
        return dataset_base.load_streams(cfg, training_seed, "test config")

    picks = {seed: pick(seed) for seed in (0, 1, 2)}
    rows = {seed: [int(x[0, 0, 0].item()) // 18 for x in out["inputs"]] for seed, out in picks.items()}  # sample index
    for seed, idx in rows.items():
        assert len(set(idx)) == 6 and all(0 <= i < 20 for i in idx)       # 6 distinct samples of the data
        assert torch.equal(picks[seed]["inputs"], torch.from_numpy(data[idx]).float())
        assert torch.equal(picks[seed]["targets"], picks[seed]["inputs"])  # the same samples for both
    assert torch.equal(pick(1, training_seed=7)["inputs"], picks[1]["inputs"])  # the training seed plays no part
    assert len({tuple(idx) for idx in rows.values()}) > 1                 # other split seeds, other subsets
    assert rows[0] != list(range(6)) or rows[1] != list(range(6))         # not just the first ones


def test_too_many_n_inputs_is_user_error(npy):
    path, _ = npy
    with pytest.raises(UserError, match=r"n_inputs.*only 20"):
        load({"s": file_stream(path, n_inputs=21)})


def test_postprocessing_function(npy):
    path, data = npy
    high = float(data.max())
    out = load({"s": file_stream(path, n_inputs=4, data_read_postprocessing_fn="scale_to_symmetric",
                                 data_read_postprocessing_fn_args={"low": 0.0, "high": high})})["s"]
    expected = torch.from_numpy(data[:4]).float() / high * 2 - 1
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("stream, key", [
    ({"data_read_type": "file", "file_reader": "read_npy"}, "dataset.s.data_path"),
    ({"data_read_type": "file", "data_path": "/nonexistent/x.npy", "file_reader": "read_npy"}, "dataset.s.data_path"),
    ({"data_read_type": "function", "data_generating_function": "random_norml", "n_inputs": 2},
     "dataset.s.data_generating_function"),
    ({"data_read_type": "function", "data_generating_function": "random_normal", "n_inputs": 2,
      "data_generating_function_args": {"shpe": [1]}}, "dataset.s.data_generating_function_args.shpe"),
    ({"data_read_type": "files", "data_path": "/", "file_reader": "read_npy"}, "dataset.s.data_read_type"),
    ({"data_read_type": "function", "data_generating_function": "random_normal", "n_inputs": 2,
      "data_batch_transform": "random_flp"}, "dataset.s.data_batch_transform"),
])
def test_bad_stream_configs_are_user_errors(stream, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        streams_cfg({"s": stream})


@pytest.mark.parametrize("stream, key", [
    ({"data_read_type": "function", "data_generating_function": "random_normal", "n_inputs": 2,
      "data_generating_function_args": {"n_samples": 3}}, "dataset.s.data_generating_function_args.n_samples"),
    ({"data_read_type": "function", "data_generating_function": "random_normal", "n_inputs": 2,
      "data_batch_transform": "random_flip", "data_batch_transform_args": {"generator": 1}},
     "dataset.s.data_batch_transform_args.generator"),
])
def test_args_the_pipeline_passes_itself_are_rejected(stream, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        streams_cfg({"s": stream})


def test_data_len_key_must_name_a_stream():
    with pytest.raises(UserError, match=r"dataset\.data_len_key.*did you mean 's'"):
        streams_cfg({"s": dict(ANY_STREAM, n_inputs=2)}, len_key="ss")


# ---- a corrupt image, end to end ---------------------------------------------------------------
@pytest.mark.slow
def test_train_on_a_folder_with_a_corrupt_image_exits_2_naming_it(repo, tmp_path):
    """train.py on the toy GAN with its real images read from a folder of PNGs, one of them
    garbage: `error: ...` naming that file, exit status 2, no traceback, no run folder."""
    folder = tmp_path / "real_images"
    folder.mkdir()
    for i, name in enumerate(["a.png", "b.png", "d.png"]):
        torchvision.io.write_png(random_image((1, 4, 4), seed=i), str(folder / name))
    corrupt = folder / "c.png"
    corrupt.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)))
    run_name = "td_corrupt_image"
    overrides = ["dataset.real_images.data_read_type=folder", f"dataset.real_images.data_path={folder}",
                 "dataset.real_images.file_reader=read_image", "dataset.real_images.file_reader_args={grayscale: true}",
                 f"saving.save_folder_name={run_name}", "training.n_epochs=1"]
    proc = run(repo, "train.py", "-t", TRAIN_CFG, *[x for item in overrides for x in ("--set", item)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    assert "error:" in proc.stderr and str(corrupt) in proc.stderr, proc.stderr[-3000:]
    assert not (repo / CHECKPOINTS / run_name).exists()
    assert not (repo / "results/example_model" / run_name).exists()


# ---- the Dataset and its batches ---------------------------------------------------------------
def arange_streams():
    return {"long": torch.arange(10.0).view(10, 1, 1).expand(10, 2, 3).contiguous(),
            "short": torch.arange(100.0, 104.0).view(4, 1)}


def test_dataset_batches_are_dicts_of_streams_and_short_streams_wrap():
    ds = dataset.PipelineDataset(arange_streams(), torch.arange(10))
    assert len(ds) == 10
    batches = list(dataset.make_loader(ds, dataset.EpochBatches(10, 4, seed=0, shuffle=False)))
    assert len(batches) == 3
    for b in batches:
        assert set(b) == {"long", "short"}
    assert [b["long"].shape for b in batches] == [(4, 2, 3), (4, 2, 3), (2, 2, 3)]
    assert [b["short"].shape for b in batches] == [(4, 1), (4, 1), (2, 1)]
    longs = torch.cat([b["long"][:, 0, 0] for b in batches])
    shorts = torch.cat([b["short"][:, 0] for b in batches])
    assert longs.tolist() == list(range(10))
    assert shorts.tolist() == [100 + i % 4 for i in range(10)]  # sample i of a 4-sample stream is i % 4
    item = ds[6]
    assert item["long"].shape == (2, 3) and item["short"].item() == 102


def test_a_dataset_of_some_indices_holds_those_samples():
    """Positions count in `indices` (e.g. the training part of a split); short streams still wrap."""
    ds = dataset.PipelineDataset(arange_streams(), torch.tensor([1, 7, 9]))
    assert len(ds) == 3
    batch = ds.__getitems__((0, torch.tensor([2, 0])))
    assert batch["long"][:, 0, 0].tolist() == [9, 1] and batch["short"][:, 0].tolist() == [101, 101]


def epoch_order(sampler, epoch, skip=0):
    sampler.set_epoch(epoch, skip)
    return [(seed, positions.tolist()) for seed, positions in sampler]


def test_shuffled_batches_visit_every_sample_once_per_epoch_and_are_seeded():
    def orders(seed):
        sampler = dataset.EpochBatches(10, 3, seed)
        return [[p for _, positions in epoch_order(sampler, epoch) for p in positions] for epoch in (1, 2)]
    first, again, other = orders(0), orders(0), orders(1)
    for order in first:
        assert sorted(order) == list(range(10))
    assert first == again
    assert first[0] != first[1]  # reshuffled every epoch
    assert first[0] != other[0]  # another seed, another order


def test_ddp_processes_share_out_an_epochs_samples():
    ranks = [dataset.EpochBatches(10, 3, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    shards = [[p for _, positions in epoch_order(s, 3) for p in positions] for s in ranks]
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(shards[0] + shards[1]) == list(range(10))
    seeds = [[seed for seed, _ in epoch_order(s, 3)] for s in ranks]
    assert not set(seeds[0]) & set(seeds[1])  # each process draws its own augmentations


def test_resumed_epoch_skips_the_batches_already_trained_and_draws_the_same_augmentations():
    ds = dataset.PipelineDataset(arange_streams(), torch.arange(10),
                                 [dataset.Transform("add_gaussian_noise", {"std": 1.0}, ["long"], "dataset")])
    sampler = dataset.EpochBatches(10, 3, seed=0)
    sampler.set_epoch(4)
    full = list(dataset.make_loader(ds, sampler))
    sampler.set_epoch(4, skip=2)  # two batches trained before the interruption
    assert len(sampler) == 4  # the whole epoch's, as the progress bar and schedules count it
    resumed = list(dataset.make_loader(ds, sampler))
    assert len(resumed) == 2
    for a, b in zip(resumed, full[2:]):
        assert torch.equal(a["long"], b["long"]) and torch.equal(a["short"], b["short"])


def test_fixed_batches_hold_every_sample_once_with_the_same_seeds_every_time():
    batches = list(dataset.FixedBatches(10, 4, seed=3))
    assert torch.cat([p for _, p in batches]).tolist() == list(range(10))
    assert [len(p) for _, p in batches] == [4, 4, 2]
    assert [s for s, _ in batches] == [s for s, _ in dataset.FixedBatches(10, 4, seed=3)]
    assert [s for s, _ in batches] != [s for s, _ in dataset.FixedBatches(10, 4, seed=4)]
    shards = [torch.cat([p for _, p in dataset.FixedBatches(10, 4, 3, num_replicas=3, rank=r)]) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))  # no padding: every sample counts once


def test_batch_transforms_from_config_are_applied_and_seeded():
    cfg = streams_cfg({"img": {"data_read_type": "function", "data_generating_function": "blobs", "n_inputs": 16,
                               "data_batch_transform": "random_flip",
                               "data_batch_transform_args": {"horizontal": True, "vertical": False}},
                       "noise": {"data_read_type": "function", "data_generating_function": "random_normal",
                                 "n_inputs": 16, "data_batch_transform": "add_gaussian_noise",
                                 "data_batch_transform_args": {"std": 0.5}}})
    streams = dataset_base.load_streams(cfg, 0, "test config")

    def batch(seed):
        ds = dataset.build_dataset(streams, cfg, torch.arange(16), True, "dataset")
        return next(iter(dataset.make_loader(ds, dataset.EpochBatches(16, 16, seed, shuffle=False))))
    a, b, other = batch(0), batch(0), batch(1)
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["noise"], b["noise"])
    assert not torch.equal(a["noise"], other["noise"])
    flipped = [not torch.equal(a["img"][i], streams["img"][i]) for i in range(16)]
    for i in range(16):
        assert torch.equal(a["img"][i], streams["img"][i]) or torch.equal(a["img"][i], streams["img"][i].flip(-1))
    assert any(flipped)
    assert not torch.equal(a["noise"], streams["noise"])
    assert (a["noise"] - streams["noise"]).std().item() == pytest.approx(0.5, rel=0.25)


def test_stream_transforms_run_first_and_evaluation_keeps_only_in_evaluation_entries():
    """Training: each stream's data_batch_transform, then batch_transforms in order; validation
    and evaluate.py: only the entries marked in_evaluation."""
    cfg = streams_cfg({"x": dict(ANY_STREAM, data_batch_transform="normalize",
                                 data_batch_transform_args={"mean": 1.0, "std": 1.0})},
                      batch_transforms=[entry("normalize", ["x"], mean=0.0, std=0.5),
                                        entry("normalize", ["x"], in_evaluation=True, mean=3.0, std=1.0)])
    streams = {"x": torch.arange(4.0).view(4, 1, 1, 1)}
    trained = whole_batch(dataset.build_dataset(streams, cfg, torch.arange(4), True, "dataset"))["x"]
    evaluated = whole_batch(dataset.build_dataset(streams, cfg, torch.arange(4), False, "dataset"))["x"]
    assert torch.equal(trained, (streams["x"] - 1) * 2 - 3)
    assert torch.equal(evaluated, streams["x"] - 3)


# ---- paired streams stay aligned ---------------------------------------------------------------
def distinct_images(n=16, channels=1, size=6):
    """n samples [channels, size, size] with every value different (sample i holds values from
    i * per_sample on), none of them symmetric."""
    per_sample = channels * size * size
    return torch.arange(float(n * per_sample)).view(n, channels, size, size)


def test_paired_function_transforms_keep_the_streams_aligned():
    cfg = transforms_cfg(["inputs", "targets"],
                         entry("random_flip", ["inputs", "targets"], horizontal=True, vertical=True),
                         entry("random_crop", ["inputs", "targets"], size=4))
    images = distinct_images()
    streams = {"inputs": images, "targets": images + 1000}  # target i is input i + 1000
    ds = dataset.build_dataset(streams, cfg, torch.arange(16), True, "dataset")
    for seed in range(3):
        batch = whole_batch(ds, seed)
        assert batch["inputs"].shape == batch["targets"].shape == (16, 1, 4, 4)
        assert torch.equal(batch["targets"], batch["inputs"] + 1000)
        assert all(batch["inputs"][i].min() // 36 == i for i in range(16))  # sample i is still sample i


def variants(image):
    """The flips of one [C, H, W] image: none, left-right, up-down, both."""
    return [image, image.flip(-1), image.flip(-2), image.flip(-1).flip(-2)]


def test_paired_flips_and_crops_are_drawn_per_sample():
    """16 copies of one image through a paired flip: each comes out as one of its flips, the
    two streams alike, and not all the same way (a flip per batch would fail this)."""
    image = distinct_images(1)[0]
    same = image.expand(16, -1, -1, -1).contiguous()
    streams = {"inputs": same, "targets": same.clone()}
    flips = transforms_cfg(["inputs", "targets"],
                           entry("random_flip", ["inputs", "targets"], horizontal=True, vertical=True))
    batch = whole_batch(dataset.build_dataset(streams, flips, torch.arange(16), True, "dataset"), seed=5)
    assert torch.equal(batch["inputs"], batch["targets"])
    kinds = [[torch.equal(sample, v) for v in variants(image)].index(True) for sample in batch["inputs"]]
    assert len(set(kinds)) > 1, kinds
    crops = transforms_cfg(["inputs", "targets"], entry("random_crop", ["inputs", "targets"], size=3))
    batch = whole_batch(dataset.build_dataset(streams, crops, torch.arange(16), True, "dataset"), seed=5)
    assert torch.equal(batch["inputs"], batch["targets"])
    corners = [int(sample[0, 0, 0]) for sample in batch["inputs"]]  # top * 6 + left of each window
    for sample, corner in zip(batch["inputs"], corners):
        top, left = divmod(corner, 6)
        assert torch.equal(sample, image[:, top:top + 3, left:left + 3])
    assert len(set(corners)) > 1, corners


V2_PAIRED = [entry("RandomResizedCrop", ["rgb", "mask"], size=[6, 6]),
             entry("RandomHorizontalFlip", ["rgb", "mask"]),
             entry("RandomRotation", ["rgb", "mask"], degrees=30)]


def test_paired_torchvision_transforms_keep_the_streams_aligned():
    """torchvision.transforms.v2 classes listed with several streams: the same crop, flip and
    rotation for sample i of each (here a 3-channel image and its first channel as a mask),
    different ones for different samples."""
    cfg = transforms_cfg(["rgb", "mask"], *V2_PAIRED)
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    rgb = image.expand(8, -1, -1, -1).contiguous()
    streams = {"rgb": rgb, "mask": rgb[:, :1].clone()}
    batch = whole_batch(dataset.build_dataset(streams, cfg, torch.arange(8), True, "dataset"), seed=1)
    assert batch["rgb"].shape == (8, 3, 6, 6) and batch["mask"].shape == (8, 1, 6, 6)
    assert type(batch["rgb"]) is torch.Tensor  # plain tensors again, not tv_tensors
    assert torch.equal(batch["mask"], batch["rgb"][:, :1])
    assert len({tuple(sample.flatten().tolist()) for sample in batch["rgb"]}) > 1  # drawn per sample


def test_paired_torchvision_transforms_on_samples_without_a_channel_dim():
    """Samples [H, W] (e.g. a stream read from a .npy of N x H x W) get the same flip too."""
    cfg = transforms_cfg(["inputs", "targets"], entry("RandomHorizontalFlip", ["inputs", "targets"], p=1.0))
    images = distinct_images(4, size=6)[:, 0]  # [4, 6, 6]
    streams = {"inputs": images, "targets": images.clone()}
    batch = whole_batch(dataset.build_dataset(streams, cfg, torch.arange(4), True, "dataset"))
    assert torch.equal(batch["inputs"], images.flip(-1)), "the first stream was not flipped"
    assert torch.equal(batch["targets"], images.flip(-1)), "the second stream was not flipped like the first"


def test_a_transform_listed_on_one_stream_changes_only_that_stream():
    cfg = transforms_cfg(["inputs", "targets"], entry("add_gaussian_noise", ["inputs"], std=0.5))
    images = distinct_images()
    streams = {"inputs": images, "targets": images.clone()}
    batch = whole_batch(dataset.build_dataset(streams, cfg, torch.arange(16), True, "dataset"))
    assert torch.equal(batch["targets"], images)
    assert (batch["inputs"] - images).std().item() == pytest.approx(0.5, rel=0.2)


def test_torchvision_transforms_neither_use_nor_change_the_global_rng():
    """Dropout and weight initialisation draw from torch's global generator: a batch's v2
    transforms leave it as it was, and do not depend on it."""
    cfg = transforms_cfg(["rgb", "mask"], *V2_PAIRED)
    rgb = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ds = dataset.build_dataset({"rgb": rgb, "mask": rgb[:, :1].clone()}, cfg, torch.arange(8), True, "dataset")
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = whole_batch(ds, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    again = whole_batch(ds, seed=7)
    assert torch.equal(first["rgb"], again["rgb"]) and torch.equal(first["mask"], again["mask"])


@pytest.mark.parametrize("entries", [
    [entry("random_flip", ["inputs", "targets"], vertical=True), entry("random_crop", ["inputs", "targets"], size=4),
     entry("add_gaussian_noise", ["inputs"])],
    [entry("RandomResizedCrop", ["inputs", "targets"], size=[4, 4]), entry("RandomRotation", ["inputs"], degrees=45)],
], ids=["functions", "torchvision"])
def test_a_batch_is_fixed_by_its_seed_and_positions(entries):
    cfg = transforms_cfg(["inputs", "targets"], *entries)
    images = distinct_images()
    ds = dataset.build_dataset({"inputs": images, "targets": images + 1}, cfg, torch.arange(16), True, "dataset")
    positions = torch.tensor([3, 1, 4, 15, 9, 2])
    a, b, other = (ds.__getitems__((seed, positions)) for seed in (11, 11, 12))
    for name in ("inputs", "targets"):
        assert torch.equal(a[name], b[name])
    assert not torch.equal(a["inputs"], other["inputs"])


# ---- paired streams must be equally many -------------------------------------------------------
@pytest.fixture(scope="module")
def unet_model():
    torch.manual_seed(0)
    return model_base.build_model(UNET_MODEL)


def unet_cfg(*overrides, n=64):
    """The U-Net example's training config on its first n images (a small batch)."""
    return config.load_training_config(UNET_CFG, [f"dataset.noisy_images.n_inputs={n}",
                                                  f"dataset.clean_images.n_inputs={n}",
                                                  "training.batch_size=8", *overrides])


def test_paired_streams_of_different_lengths_are_a_user_error(unet_model):
    cfg = unet_cfg("dataset.noisy_images.n_inputs=30", n=32)
    with pytest.raises(UserError) as e:
        train.make_loaders(cfg, unet_model, CPU, "unet.yaml")
    message = str(e.value)
    assert "noisy_images has 30 samples" in message and "clean_images has 32" in message


def test_unpaired_gan_streams_may_differ_in_length_but_not_without_adversarial_training():
    """A GAN's noise and real images are not paired (any lengths); the same flow trained
    without a discriminator compares output i with target i, so they must be equally many."""
    torch.manual_seed(0)
    model = model_base.build_model(EXAMPLE_MODEL)
    streams = {"gen_inputs": torch.zeros(8, 1, 4, 4), "real_images": torch.zeros(5, 1, 4, 4)}
    cli.check_data_fits_model(streams, model, True, "toy.yaml")
    with pytest.raises(UserError, match=r"toy\.yaml: dataset: gen_inputs has 8 samples but real_images has 5"):
        cli.check_data_fits_model(streams, model, False, "toy.yaml")


# ---- the training / validation split -----------------------------------------------------------
@pytest.mark.parametrize("n, fraction", [(10, 0.1), (64, 0.1), (101, 0.25), (7, 0.5), (1000, 0.9)])
def test_split_indices_are_disjoint_sorted_and_cover_everything(n, fraction):
    train_idx, val_idx = dataset_base.split_indices(n, fraction, 0, "dataset")
    assert len(val_idx) == round(n * fraction) and len(train_idx) == n - len(val_idx)
    assert sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(n))
    assert train_idx.tolist() == sorted(train_idx.tolist()) and val_idx.tolist() == sorted(val_idx.tolist())


def test_split_is_fixed_by_split_seed():
    split = dataset_base.split_indices
    a, b, c = split(100, 0.2, 0, "d"), split(100, 0.2, 0, "d"), split(100, 0.2, 1, "d")
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])
    assert a[1].tolist() != list(range(20)) and a[1].tolist() != list(range(80, 100))  # drawn, not a block


def test_no_validation_fraction_means_no_validation_set():
    train_idx, val_idx = dataset_base.split_indices(10, 0.0, 0, "dataset")
    assert val_idx is None and train_idx.tolist() == list(range(10))


@pytest.mark.parametrize("n, fraction", [(10, 0.01), (10, 0.97), (1, 0.5)])
def test_a_split_leaving_a_side_empty_is_a_user_error(n, fraction):
    with pytest.raises(UserError, match=r"cfg\.yaml: dataset\.validation_fraction"):
        dataset_base.split_indices(n, fraction, 0, "cfg.yaml: dataset")


def test_split_does_not_depend_on_the_training_seed(unet_model):
    def held_out(*overrides):
        _, validation = train.make_loaders(unet_cfg(*overrides), unet_model, CPU, "unet.yaml")
        return validation.dataset.indices
    first = held_out()
    assert torch.equal(first, held_out("training.seed=5"))
    assert not torch.equal(first, held_out("dataset.split_seed=5"))


def test_make_loaders_splits_and_validation_gets_only_its_in_evaluation_noise(unet_model):
    """The U-Net example (paired flips; noise on noisy_images with in_evaluation): the training and
    validation loaders hold complementary samples; validation batches are not flipped but get
    the noise, the same on every pass; training batches are flipped."""
    cfg = unet_cfg()
    loader, validation = train.make_loaders(cfg, unet_model, CPU, "unet.yaml")
    train_idx, val_idx = loader.dataset.indices, validation.dataset.indices
    assert len(val_idx) == round(64 * 0.1) and len(train_idx) == 64 - len(val_idx)
    assert sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(64))
    expected = dataset_base.split_indices(64, 0.1, cfg["dataset"]["split_seed"], "dataset")
    assert torch.equal(train_idx, expected[0]) and torch.equal(val_idx, expected[1])
    clean = validation.dataset.streams["clean_images"]

    passes = [list(validation) for _ in range(2)]
    assert torch.cat([b["clean_images"] for b in passes[0]]).shape[0] == len(val_idx)
    held_out = clean[val_idx]
    assert torch.equal(torch.cat([b["clean_images"] for b in passes[0]]), held_out)  # in order, not flipped
    noise = torch.cat([b["noisy_images"] for b in passes[0]]) - held_out
    assert noise.std().item() == pytest.approx(0.5, rel=0.15)
    for a, b in zip(*passes):
        assert torch.equal(a["noisy_images"], b["noisy_images"])

    loader.batch_sampler.set_epoch(1)
    flipped = 0
    for seed, positions in loader.batch_sampler:
        batch = loader.dataset.__getitems__((seed, positions))
        for sample, i in zip(batch["clean_images"], train_idx[positions]):
            kinds = [torch.equal(sample, v) for v in variants(clean[i])]
            assert any(kinds)
            flipped += not kinds[0]
        assert (batch["noisy_images"] - batch["clean_images"]).std().item() == pytest.approx(0.5, rel=0.3)
    assert flipped > 0


def test_evaluate_scores_the_samples_training_held_out(unet_model):
    import evaluate
    cfg = unet_cfg()
    _, validation = train.make_loaders(cfg, unet_model, CPU, "unet.yaml")
    streams = validation.dataset.streams
    record = {"n_samples": 64, "validation_fraction": 0.1, "split_seed": 0, "batch_size": 8}
    data, split, batches = evaluate.evaluation_data(streams, cfg["dataset"], {"split": record}, None, "unet.yaml",
                                                    "eval.yaml: evaluation.data_split")
    assert split == "validation" and torch.equal(data.indices, validation.dataset.indices)
    assert [t.name for t in data.transforms] == ["add_gaussian_noise"]
    # the inputs validation saw, noise included
    made = evaluate.first_samples(data, 5, batches)
    seen = next(iter(validation))
    assert all(torch.equal(made[name], seen[name][:5]) for name in seen)
    # a checkpoint whose run split another number of samples cannot say which are held out
    with pytest.raises(UserError, match=r"eval\.yaml: evaluation\.data_split: validation, but the run split 100"):
        evaluate.evaluation_data(streams, cfg["dataset"], {"split": {**record, "n_samples": 100}}, None, "unet.yaml",
                                 "eval.yaml: evaluation.data_split")
    # one from before validation splits held nothing out
    assert evaluate.evaluation_data(streams, cfg["dataset"], {}, None, "unet.yaml", "eval.yaml")[1] == "all"


# ---- config errors -----------------------------------------------------------------------------
BAD_DATASET_KEYS = {  # name: (the dataset section's own keys, texts one line of the error must hold)
    "unknown transform": ({"batch_transforms": [entry("random_flp", ["inputs"])]},
                          ["dataset.batch_transforms[0].transform", "random_flp", "did you mean 'random_flip'"]),
    "unknown torchvision class": ({"batch_transforms": [entry("RandomHorizontalFlp", ["inputs"])]},
                                  ["dataset.batch_transforms[0].transform", "did you mean 'RandomHorizontalFlip'"]),
    "transform not a name": ({"batch_transforms": [{"transform": ["random_flip"], "streams": ["inputs"]}]},
                             ["dataset.batch_transforms[0].transform", "is not a string"]),
    "function arg misspelt": ({"batch_transforms": [entry("random_flip", ["inputs"], horizonal=True)]},
                              ["dataset.batch_transforms[0].args.horizonal", "did you mean 'horizontal'"]),
    "function arg missing": ({"batch_transforms": [entry("random_crop", ["inputs"])]},
                             ["dataset.batch_transforms[0].args", "random_crop needs size"]),
    "function arg the pipeline passes": ({"batch_transforms": [entry("random_flip", ["inputs"], generator=1)]},
                                         ["dataset.batch_transforms[0].args.generator"]),
    "class arg unknown": ({"batch_transforms": [entry("random_flip", ["inputs"]),
                                                entry("RandomHorizontalFlip", ["inputs"], prob=0.5)]},
                          ["dataset.batch_transforms[1].args.prob", "RandomHorizontalFlip", "valid: p"]),
    "class arg missing": ({"batch_transforms": [entry("RandomResizedCrop", ["inputs"])]},
                          ["dataset.batch_transforms[0].args", "RandomResizedCrop needs size"]),
    "unknown stream": ({"batch_transforms": [entry("random_flip", ["inputs", "targts"])]},
                       ["dataset.batch_transforms[0].streams", "'targts' is not a stream", "did you mean 'targets'"]),
    "empty streams": ({"batch_transforms": [entry("random_flip", [])]},
                      ["dataset.batch_transforms[0].streams", "empty"]),
    "no streams": ({"batch_transforms": [{"transform": "random_flip"}]},
                   ["dataset.batch_transforms[0].streams", "required"]),
    "streams misspelt": ({"batch_transforms": [{"transform": "random_flip", "stream": ["inputs"]}]},
                         ["dataset.batch_transforms[0].stream", "did you mean 'streams'"]),
    "entry not a mapping": ({"batch_transforms": ["random_flip"]}, ["dataset.batch_transforms[0]", "not a mapping"]),
    "batch_transforms not a list": ({"batch_transforms": entry("random_flip", ["inputs"])},
                                    ["dataset.batch_transforms", "is not a list"]),
    "in_evaluation not a bool": ({"batch_transforms": [dict(entry("random_flip", ["inputs"]), in_evaluation="yes")]},
                                 ["dataset.batch_transforms[0].in_evaluation", "true/false"]),
    "validation_fraction 1": ({"validation_fraction": 1.0}, ["dataset.validation_fraction", "[0, 1)"]),
    "validation_fraction negative": ({"validation_fraction": -0.1}, ["dataset.validation_fraction", "[0, 1)"]),
    "split_seed negative": ({"split_seed": -1}, ["dataset.split_seed"]),
    "num_workers negative": ({"num_workers": -1}, ["dataset.num_workers", "in [0, 256]"]),
    "pin_memory not a bool": ({"pin_memory": "yes"}, ["dataset.pin_memory", "true/false"]),
    "stream transform class arg unknown": (
        {"inputs": dict(ANY_STREAM, data_batch_transform="RandomHorizontalFlip",
                        data_batch_transform_args={"prob": 1})},
        ["dataset.inputs.data_batch_transform_args.prob", "valid: p"]),
    "stream transform not a name": ({"inputs": dict(ANY_STREAM, data_batch_transform=["random_flip"])},
                                    ["dataset.inputs.data_batch_transform", "is not a string"]),
}


@pytest.mark.parametrize("name", BAD_DATASET_KEYS)
def test_bad_dataset_keys_are_user_errors_naming_the_key(name):
    keys, expected = BAD_DATASET_KEYS[name]
    raw = {"data_len_key": "inputs", "inputs": dict(ANY_STREAM), "targets": dict(ANY_STREAM), **keys}
    errors = []
    config.check_dataset(raw, "dataset", errors)
    with pytest.raises(UserError) as e:
        config.raise_if(errors, "cfg.yaml")
    message = str(e.value)
    assert message.startswith("cfg.yaml: ")
    assert any(all(text in line for text in expected) for line in message.splitlines()), message


@pytest.mark.parametrize("transform, args, problem", [
    ("RandomRotation", {"degrees": -5}, "must be positive"),
    ("RandomResizedCrop", {"size": "abc"}, "size"),
])
def test_torchvision_args_it_rejects_are_user_errors(transform, args, problem):
    cfg = transforms_cfg(["inputs"], entry(transform, ["inputs"], **args))
    with pytest.raises(UserError) as e:
        dataset.build_dataset({"inputs": torch.zeros(2, 1, 4, 4)}, cfg, torch.arange(2), True, "cfg.yaml: dataset")
    assert "cfg.yaml: dataset.batch_transforms[0]" in str(e.value) and transform in str(e.value)
    assert problem in str(e.value)


def test_a_transform_failing_on_a_batch_is_a_user_error_naming_the_entry():
    cfg = transforms_cfg(["inputs"], entry("random_crop", ["inputs"], size=8))
    ds = dataset.build_dataset({"inputs": torch.zeros(2, 1, 4, 4)}, cfg, torch.arange(2), True, "cfg.yaml: dataset")
    with pytest.raises(UserError,
                       match=r"cfg\.yaml: dataset\.batch_transforms\[0\]: random_crop.*inputs \[2, 1, 4, 4\]"):
        whole_batch(ds)


def test_persistent_workers_without_workers_is_a_user_error():
    cfg = transforms_cfg(["inputs"], entry("random_flip", ["inputs"]), persistent_workers=True)
    ds = dataset.build_dataset({"inputs": torch.zeros(2, 1, 4, 4)}, cfg, torch.arange(2), True, "dataset")
    for workers in (0, None):  # none asked for, or none by default (function transforms only)
        with pytest.raises(UserError, match=r"cfg\.yaml: dataset\.persistent_workers.*dataset\.num_workers"):
            dataset.loading_settings(dict(cfg, num_workers=workers), ds, False, 1, "cfg.yaml: dataset")


# ---- loaders -----------------------------------------------------------------------------------
def test_worker_processes_make_the_same_batches_as_the_main_process():
    """Batches, random transforms included, depend on (seed, epoch, batch), not on which
    process makes them: a run is the same whatever num_workers is."""
    cfg = transforms_cfg(["rgb", "mask"], entry("random_flip", ["rgb", "mask"], vertical=True), *V2_PAIRED,
                         entry("add_gaussian_noise", ["rgb"]))
    rgb = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ds = dataset.build_dataset({"rgb": rgb, "mask": rgb[:, :1].clone()}, cfg, torch.arange(20), True, "dataset")

    def epoch(num_workers):
        sampler = dataset.EpochBatches(20, 6, seed=3)
        sampler.set_epoch(2)
        return list(dataset.make_loader(ds, sampler, num_workers=num_workers))
    here, workers = epoch(0), epoch(2)
    assert len(here) == len(workers) == 4
    for a, b in zip(here, workers):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_loading_settings_defaults_fit_the_transforms():
    """Function transforms are a few tensor ops: batches are made in the training process.
    A torchvision class runs per sample: worker processes. No pinned memory on the CPU."""
    functions = transforms_cfg(["inputs"], entry("random_flip", ["inputs"]))
    per_sample = transforms_cfg(["inputs"], entry("RandomHorizontalFlip", ["inputs"]))
    data = {"inputs": torch.zeros(2, 1, 4, 4)}

    def settings(cfg, on_gpu=False, world_size=1, **keys):
        ds = dataset.build_dataset(data, cfg, torch.arange(2), True, "dataset")
        return dataset.loading_settings(dict(cfg, **keys), ds, on_gpu, world_size, "dataset")
    assert settings(functions) == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    auto = settings(per_sample)
    assert 0 < auto["num_workers"] <= min(4, os.cpu_count())  # up to 4, no more than the CPUs
    assert auto["persistent_workers"] is True and auto["pin_memory"] is False
    assert settings(per_sample, world_size=os.cpu_count())["num_workers"] <= 1  # the CPUs shared by the processes
    assert settings(functions, num_workers=3)["num_workers"] == 3
    assert settings(functions, on_gpu=True)["pin_memory"] is True
    assert settings(functions, pin_memory=False, on_gpu=True)["pin_memory"] is False
    assert isinstance(dataset.make_loader(dataset.PipelineDataset(data, torch.arange(2)),
                                          dataset.FixedBatches(2, 1, 0)), dataset.BatchLoader)


# ---- validation during training ----------------------------------------------------------------
def small_trainer(tmp_path, *overrides):
    """A Trainer of the U-Net example on 8 images (6 to train on, 2 held out), batches of 3,
    saving into tmp_path."""
    cfg = unet_cfg("training.batch_size=3", "dataset.validation_fraction=0.25", "training.n_epochs=2",
                   "saving.save_epoch_increment=1", *overrides, n=8)
    seed_everything(0)
    model = model_base.build_model(cfg["model"])
    loader, validation = train.make_loaders(cfg, model, CPU, "unet.yaml")
    run = runs.Run.of(cfg, folder=tmp_path / "run")  # (the config's own folder is in the source tree)
    return loop.Trainer(cfg, model, loader, CPU, None, validation, run)


def test_training_validates_after_every_epoch(tmp_path):
    trainer = small_trainer(tmp_path)
    assert len(trainer.loader) == 2 and len(trainer.validation_loader.dataset) == 2
    last = trainer.fit()
    history = trainer.validation.history
    assert history["step"] == [2, 4]  # the steps at the end of epochs 1 and 2
    for net in ("generator", "discriminator"):
        assert "total" in history[net] and len(history[net]) > 1
        for values in history[net].values():
            assert len(values) == 2 and all(np.isfinite(values))
    assert {"l1", "g_adv"} <= set(history["generator"])

    rows = [json.loads(line) for line in (trainer.run.folder / "metrics.jsonl").read_text().splitlines()]
    validation_rows = [row for row in rows if any(key.startswith("validation/") for key in row)]
    assert [(row["epoch"], row["step"]) for row in validation_rows] == [(1, 2), (2, 4)]
    for i, row in enumerate(validation_rows):
        for net in ("generator", "discriminator"):
            for term, values in history[net].items():
                assert row[f"validation/{net}/{term}"] == pytest.approx(values[i])
    assert len([row for row in rows if "data_wait" in row]) == 4  # one training row per step
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["validation_history"] == history

    # the last validation loss is the mean over the held-out samples of the final weights, in eval mode
    model = trainer.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in trainer.validation_loader:
            inputs, targets = model.split_batch(trainer.losses.to_device(batch))
            terms = trainer.losses.terms("generator", model(inputs), inputs, targets)
            total, count = total + terms["l1"].item() * len(inputs), count + len(inputs)
    assert history["generator"]["l1"][-1] == pytest.approx(total / count, rel=1e-5)


def test_reduce_lr_on_plateau_follows_the_validation_loss(tmp_path):
    """With a validation set, ReduceLROnPlateau steps on the validation loss (here rising while
    the training loss falls), without one on the epoch's mean training loss."""
    def lr_after(validation_totals):
        trainer = small_trainer(tmp_path, "training.scheduler=ReduceLROnPlateau",
                                "training.scheduler_args={patience: 0, factor: 0.5}")
        for epoch, validation_total in enumerate(validation_totals):
            for net in trainer.networks.values():
                net.loss_history.setdefault("total", []).extend([3.0 - epoch] * 2)  # falling
            validation = None if validation_total is None else \
                {name: {"total": validation_total} for name in trainer.networks}
            step_epoch_schedules(trainer.networks, validation, trainer.steps_per_epoch, trainer.placement)
        return trainer.networks["generator"].lr
    lr = 0.0002
    assert lr_after([1.0, 2.0, 3.0]) == pytest.approx(lr * 0.25)  # worse twice: halved twice
    assert lr_after([None, None, None]) == pytest.approx(lr)       # the training loss keeps falling


# ---- the order of an epoch ---------------------------------------------------------------------
@pytest.mark.parametrize("n, replicas, shuffle", [(1, 1, True), (7, 1, True), (7, 3, True), (16, 4, False),
                                                  (33, 2, True), (5, 4, True)])
def test_epoch_order_is_distributed_samplers(n, replicas, shuffle):
    """EpochBatches computes DistributedSampler's order and shards as one tensor: the same
    positions, padding and per-process lengths for every rank and epoch."""
    from torch.utils.data import DistributedSampler
    for rank in range(replicas):
        for epoch in (0, 3):
            reference = DistributedSampler(range(n), num_replicas=replicas, rank=rank, shuffle=shuffle, seed=5)
            reference.set_epoch(epoch)
            ours = dataset.EpochBatches(n, 4, 5, shuffle, replicas, rank)
            ours.set_epoch(epoch)
            assert ours.order().tolist() == list(reference)
            assert torch.cat([p for _, p in ours]).tolist() == list(reference)
            assert len(ours) == -(-len(reference) // 4)


# ---- folders left on disk (in_memory: false) ---------------------------------------------------
def lazy_stream(folder, **more):
    return {"data_read_type": "folder", "data_path": str(folder), "file_reader": "read_image", "in_memory": False,
            **more}


def test_a_folder_left_on_disk_gives_the_samples_the_in_memory_read_gives(pngs):
    folder, images = pngs
    on_disk = load({"s": lazy_stream(folder)})["s"]
    assert isinstance(on_disk, dataset_base.FileStream)
    assert len(on_disk) == 3 and on_disk.shape == (3, 3, 5, 6)
    in_memory = load({"s": lazy_stream(folder, in_memory=True)})["s"]
    assert torch.equal(on_disk[torch.tensor([2, 0])], in_memory[[2, 0]])
    chosen = load({"s": lazy_stream(folder, n_inputs=2, randomize_inputs=True)})["s"]
    chosen_in_memory = load({"s": lazy_stream(folder, n_inputs=2, randomize_inputs=True, in_memory=True)})["s"]
    assert len(chosen) == 2 and torch.equal(chosen[torch.arange(2)], chosen_in_memory)  # the same seeded choice


def test_a_dataset_reading_files_gets_worker_processes_and_reports_an_unreadable_file_cleanly(pngs):
    """Files are read as batches are made, in worker processes by default; a corrupt file stops
    the loop with a user error naming it, not a worker's traceback."""
    folder, _ = pngs
    (folder / "d.png").write_bytes(b"not a png")
    cfg = streams_cfg({"s": lazy_stream(folder)})
    streams = dataset_base.load_streams(cfg, 0, "cfg.yaml")
    ds = dataset.build_dataset(streams, cfg, torch.arange(4), True, "cfg.yaml: dataset")
    settings = dataset.loading_settings(cfg, ds, False, 1, "cfg.yaml: dataset")
    assert settings["num_workers"] >= 1
    loader = dataset.make_loader(ds, dataset.EpochBatches(4, 4, 0, shuffle=False), **settings)
    with pytest.raises(UserError) as caught:
        list(loader)
    message = str(caught.value)
    assert "d.png" in message and "dataset.s" in message and "Traceback" not in message


@pytest.mark.parametrize("stream, key", [
    ({"data_read_type": "file", "data_path": "data/example_model/blobs_4x4.npy", "file_reader": "read_npy"},
     "in_memory"),
    ({"multiple_samples_per_file": True}, "in_memory"),
    ({"data_read_postprocessing_fn": "scale_to_symmetric"}, "data_read_postprocessing_fn"),
])
def test_in_memory_false_is_only_for_folders_of_single_samples(pngs, stream, key):
    folder, _ = pngs
    raw = {**lazy_stream(folder), **stream}
    with pytest.raises(UserError, match=rf"dataset\.s\.{key}:"):
        streams_cfg({"s": raw})


def test_validation_batches_unlike_training_ones_are_a_user_error():
    """A stream's own data_batch_transform runs in training only: if it is what turns bytes into
    floats, validation would feed the model bytes; that is caught before training starts."""
    cfg = streams_cfg({"images": dict(ANY_STREAM, data_batch_transform="to_float")}, validation_fraction=0.5)
    streams = {"images": torch.zeros(4, 1, 2, 2, dtype=torch.uint8)}
    model = types.SimpleNamespace(input_key="images", input_size=(1, 2, 2), input_keys=("images",),
                                  input_sizes={"images": (1, 2, 2)}, input_dtypes={"images": torch.float32},
                                  architecture_path="arch.yaml")
    built = {split: dataset.build_dataset(streams, cfg, torch.arange(2), split == "training", "cfg.yaml: dataset")
             for split in ("training", "validation")}
    with pytest.raises(UserError, match=r"cfg\.yaml: dataset\.images: validation samples are torch\.uint8 .* training "
                                        r"samples torch\.float32 .*in_evaluation: true"):
        cli.check_batches_fit_model(built, model, "cfg.yaml")
    cli.check_batches_fit_model({"training": built["training"]}, model, "cfg.yaml")  # alone, training's are fine
