"""Data streams: read types, n_inputs / randomize_inputs, postprocessing, the Dataset and loader."""
import numpy as np
import pytest
import torch
import torchvision.io

import config
import dataset
import dataset_base
from errors import UserError

# torchvision.io (used by read_image and to write the test's PNGs) warns that it is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def streams_cfg(streams, len_key=None):
    """A validated dataset section for `streams` ({name: raw stream config}); UserError if invalid."""
    errors = []
    raw = {"data_len_key": len_key or next(iter(streams)), **streams}
    out = config.check_dataset(raw, "dataset", errors)
    config.raise_if(errors, "test config")
    return out


def load(streams, seed=0, len_key=None):
    return dataset_base.load_streams(streams_cfg(streams, len_key), seed, "test config")


@pytest.fixture
def npy(tmp_path):
    data = np.arange(20 * 2 * 3 * 3, dtype=np.float64).reshape(20, 2, 3, 3)
    path = tmp_path / "data.npy"
    np.save(path, data)
    return path, data


def test_file_read_type(npy):
    path, data = npy
    out = load({"s": {"data_read_type": "file", "data_path": str(path), "file_reader": "read_npy"}})["s"]
    assert out.dtype == torch.float32 and out.shape == (20, 2, 3, 3)
    assert torch.equal(out, torch.from_numpy(data).float())


def test_file_reader_args(npy):
    path, data = npy
    out = load({"s": {"data_read_type": "file", "data_path": str(path), "file_reader": "read_npy",
                      "file_reader_args": {"dtype": "float64"}}})["s"]
    assert out.dtype == torch.float64 and torch.equal(out, torch.from_numpy(data))


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
                       "file_reader_args": {"grayscale": True}}})["s"]
    assert gray.shape == (3, 1, 5, 6)


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
        load({"s": {"data_read_type": "file", "data_path": str(path), "file_reader": "read_npy"}})


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
    out = load({"s": {"data_read_type": "file", "data_path": str(path), "file_reader": "read_npy", "n_inputs": 6}})["s"]
    assert torch.equal(out, torch.from_numpy(data[:6]).float())


def test_randomize_inputs_is_seeded(npy):
    path, data = npy
    cfg = {"s": {"data_read_type": "file", "data_path": str(path), "file_reader": "read_npy", "n_inputs": 6,
                 "randomize_inputs": True}}
    picks = {seed: load(cfg, seed)["s"] for seed in (0, 1, 2)}
    rows = {seed: [int(x[0, 0, 0].item()) // 18 for x in out] for seed, out in picks.items()}  # sample index
    assert torch.equal(load(cfg, 0)["s"], picks[0])                       # same seed, same subset
    for seed, idx in rows.items():
        assert len(set(idx)) == 6 and all(0 <= i < 20 for i in idx)       # 6 distinct samples of the data
        assert torch.equal(picks[seed], torch.from_numpy(data[idx]).float())
    assert len({tuple(idx) for idx in rows.values()}) > 1                 # other seeds, other subsets
    assert rows[0] != list(range(6)) or rows[1] != list(range(6))         # not just the first ones


def test_too_many_n_inputs_is_user_error(npy):
    path, _ = npy
    with pytest.raises(UserError, match=r"n_inputs.*only 20"):
        load({"s": {"data_read_type": "file", "data_path": str(path), "file_reader": "read_npy", "n_inputs": 21}})


def test_postprocessing_function(npy):
    path, data = npy
    high = float(data.max())
    out = load({"s": {"data_read_type": "file", "data_path": str(path), "file_reader": "read_npy",
                      "n_inputs": 4, "data_read_postprocessing_fn": "scale_to_symmetric",
                      "data_read_postprocessing_fn_args": {"low": 0.0, "high": high}}})["s"]
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


def test_h5_read_type(tmp_path):
    path = tmp_path / "data.h5"
    stream = {"data_read_type": "h5", "data_path": str(path), "h5_key": "images"}
    try:
        import h5py
    except ImportError:  # optional: a clear message naming the package
        path.write_bytes(b"")
        with pytest.raises(UserError, match="h5py"):
            load({"s": stream})
        return
    data = np.arange(24, dtype=np.float32).reshape(6, 1, 2, 2)
    with h5py.File(path, "w") as f:
        f["images"] = data
    assert torch.equal(load({"s": stream})["s"], torch.from_numpy(data))
    with pytest.raises(UserError, match=r"dataset\.s\.h5_key"):
        load({"s": dict(stream, h5_key="imgs")})


def test_data_len_key_must_name_a_stream():
    with pytest.raises(UserError, match=r"dataset\.data_len_key.*did you mean 's'"):
        streams_cfg({"s": {"data_read_type": "function", "data_generating_function": "blobs", "n_inputs": 2}},
                    len_key="ss")


# ---- the Dataset and the loader ----------------------------------------------------------------
def arange_streams():
    return {"long": torch.arange(10.0).view(10, 1, 1).expand(10, 2, 3).contiguous(),
            "short": torch.arange(100.0, 104.0).view(4, 1)}


def test_dataset_batches_are_dicts_of_streams_and_short_streams_wrap():
    ds = dataset.PipelineDataset(arange_streams(), "long")
    assert len(ds) == 10
    loader = dataset.make_loader(ds, batch_size=4, seed=0, shuffle=False)
    batches = list(loader)
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


def test_shuffled_loader_visits_every_sample_once_per_epoch_and_is_seeded():
    def epoch_orders(seed):
        loader = dataset.make_loader(dataset.PipelineDataset(arange_streams(), "long"), 3, seed)
        orders = []
        for epoch in (1, 2):
            loader.sampler.set_epoch(epoch)  # as the trainer does at the start of every epoch
            orders.append(torch.cat([b["long"][:, 0, 0] for b in loader]).tolist())
        return orders
    first, again, other = epoch_orders(0), epoch_orders(0), epoch_orders(1)
    for order in first:
        assert sorted(order) == list(range(10))
    assert first == again
    assert first[0] != first[1]  # reshuffled every epoch
    assert first[0] != other[0]  # another seed, another order


def test_loader_skips_the_samples_a_resumed_epoch_already_trained_on():
    loader = dataset.make_loader(dataset.PipelineDataset(arange_streams(), "long"), 3, seed=0)
    loader.sampler.set_epoch(4)
    full = torch.cat([b["long"][:, 0, 0] for b in loader]).tolist()
    loader.sampler.set_epoch(4, skip=6)  # two batches of 3 done before the interruption
    assert len(loader) == 2
    assert torch.cat([b["long"][:, 0, 0] for b in loader]).tolist() == full[6:]


def test_batch_transforms_from_config_are_applied_and_seeded():
    cfg = streams_cfg({"img": {"data_read_type": "function", "data_generating_function": "blobs", "n_inputs": 16,
                               "data_batch_transform": "random_flip",
                               "data_batch_transform_args": {"horizontal": True, "vertical": False}},
                       "noise": {"data_read_type": "function", "data_generating_function": "random_normal",
                                 "n_inputs": 16, "data_batch_transform": "add_gaussian_noise",
                                 "data_batch_transform_args": {"std": 0.5}}})
    streams = dataset_base.load_streams(cfg, 0, "test config")

    def batch(seed):
        ds = dataset.build_dataset(streams, cfg, seed)
        return next(iter(dataset.make_loader(ds, 16, 0, shuffle=False)))
    a, b = batch(0), batch(0)
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["noise"], b["noise"])
    flipped = [not torch.equal(a["img"][i], streams["img"][i]) for i in range(16)]
    for i in range(16):
        assert torch.equal(a["img"][i], streams["img"][i]) or torch.equal(a["img"][i], streams["img"][i].flip(-1))
    assert any(flipped)
    assert not torch.equal(a["noise"], streams["noise"])
    assert (a["noise"] - streams["noise"]).std().item() == pytest.approx(0.5, rel=0.25)
