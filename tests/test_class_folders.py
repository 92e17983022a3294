"""Real data as it sits on disk: class folders (root/<class>/<file>) and their label stream,
postprocessing steps in a list (to_images for arrays of the wrong size or layout), the
validation metrics papers report (accuracy, PSNR, SSIM), gpus: auto and num_threads.

The trees are PNGs written here, each image's brightness its class index, so that a test can
tell from the pixels alone whether a label belongs to its image."""
import json
import math

import numpy as np
import pytest
import torch
import torchvision

from conftest import SRC, newest_run, run
from dataset_base import class_folder_files, load_streams
from engine import config, metrics
from engine.errors import UserError
from engine.placement import Placement, set_num_threads

CLASSES = ["b_square", "a_circle", "c_triangle"]  # sorted: a_circle 0, b_square 1, c_triangle 2
ARCH = "models/shape_classifier/shape_classifier_architecture.yaml"
FLOW = "models/shape_classifier/shape_classifier.py"


def write_png(path, value, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.io.write_png(torch.full((1, size, size), value, dtype=torch.uint8), str(path))


def brightness_tree(root, per_class=(3, 2, 4)):
    """root/<class>/<i>.png, class index k (in sorted order) drawn at brightness 60 k + 20."""
    for name, n in zip(CLASSES, per_class):
        for i in range(n):
            write_png(root / name / f"{i:02d}.png", 60 * sorted(CLASSES).index(name) + 20)
    return root


def streams_config(root, **images):
    return {"data_len_key": "images",
            "images": {"data_read_type": "folder", "data_path": str(root), "class_folders": True,
                       "file_reader": "read_image", "file_reader_args": {"grayscale": True}, **images},
            "labels": {"data_read_type": "class_labels", "labels_of": "images"}}


def check_dataset(raw):
    errors = []
    checked = config.check_dataset(raw, "dataset", errors)
    if errors:
        raise UserError("\n".join(errors))
    return checked


def class_of_pixels(images):
    """The class index each image's brightness encodes (see brightness_tree)."""
    return ((images.flatten(1).mean(1) * 255 - 20) / 60).round().long()


# ---- reading class folders ----------------------------------------------------------------------
def test_class_folders_in_sorted_order_hidden_and_loose_files_left_out(tmp_path):
    root = brightness_tree(tmp_path / "tree")
    write_png(root / ".hidden" / "x.png", 0)  # a hidden folder is no class
    write_png(root / "a_circle" / ".x.png", 0)  # nor a hidden file a sample
    (root / "README.txt").write_text("files beside the class folders are ignored, as ImageFolder does")
    files, labels, names = class_folder_files(root, "dataset.images")
    assert names == sorted(CLASSES)
    assert labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert [f.parent.name for f in files] == [names[i] for i in labels]


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("choose", [{}, {"n_inputs": 5, "randomize_inputs": True}])
def test_each_label_belongs_to_its_image(tmp_path, in_memory, choose):
    """In memory or read batch by batch, all samples or n_inputs drawn at random: label i is the
    class of image i."""
    dataset = check_dataset(streams_config(brightness_tree(tmp_path / "tree", (6, 4, 5)), in_memory=in_memory,
                                           **choose))
    streams = load_streams(dataset, 0, "cfg.yaml")
    images, labels = streams["images"][torch.arange(len(streams["images"]))], streams["labels"]
    assert len(images) == len(labels) == choose.get("n_inputs", 15)
    assert torch.equal(class_of_pixels(images), labels)


@pytest.mark.parametrize("make, message", [
    (lambda root: (root / "b_square").mkdir(), "class folder .*b_square holds no files"),
    (lambda root: (root / "a_circle" / "notes.txt").write_text("x"), "notes.txt is not an image file"),
    (lambda root: (root / "a_circle" / "broken.png").write_bytes(b"not a png"), "could not read .*broken.png"),
])
def test_bad_trees_are_user_errors_naming_the_path(tmp_path, make, message):
    root = tmp_path / "tree"
    for name in ("a_circle", "c_triangle"):
        write_png(root / name / "0.png", 10)
    make(root)
    with pytest.raises(UserError, match=message):
        load_streams(check_dataset(streams_config(root)), 0, "cfg.yaml")


def test_a_flat_folder_is_not_a_tree_of_classes(tmp_path):
    write_png(tmp_path / "flat" / "0.png", 10)
    with pytest.raises(UserError, match="holds no class folders.*class_folders: false"):
        load_streams(check_dataset(streams_config(tmp_path / "flat")), 0, "cfg.yaml")


@pytest.mark.parametrize("change, message", [
    ({"labels": {"data_read_type": "class_labels", "labels_of": "imgs"}}, r"labels\.labels_of: 'imgs' is not a "
                                                                          r"stream \(did you mean 'images'\?\)"),
    ({"labels": {"data_read_type": "class_labels"}}, r"labels\.labels_of: required"),
    ({"labels": {"data_read_type": "class_labels", "labels_of": "images", "n_inputs": 3}},
     r"labels\.n_inputs: .*set n_inputs on that stream"),
    ({"other": {"data_read_type": "function", "data_generating_function": "random_normal", "n_inputs": 2,
                "class_folders": True}}, r"other\.class_folders: for data_read_type folder"),
    ({"labels": {"data_read_type": "class_labels", "labels_of": "noise"},
      "noise": {"data_read_type": "function", "data_generating_function": "random_normal", "n_inputs": 2}},
     r"labels\.labels_of: noise is not read from class folders; set dataset\.noise\.class_folders: true"),
])
def test_label_stream_config_errors(tmp_path, change, message):
    raw = streams_config(brightness_tree(tmp_path / "tree")) | change
    with pytest.raises(UserError, match=message):
        check_dataset(raw)


# ---- postprocessing: a list of steps, and to_images ---------------------------------------------
def test_postprocessing_list_applies_in_order(tmp_path):
    """8x8 digits as [N, H, W] values 0..16 (sklearn's): to_images adds the channel and upsamples
    to 32x32, then scale_to_symmetric maps 0..16 to [-1, 1]; no new function needed."""
    digits = torch.arange(3 * 64, dtype=torch.float32).remainder(17).view(3, 8, 8)
    np.save(tmp_path / "digits.npy", digits.numpy())
    raw = {"data_len_key": "x", "x": {"data_read_type": "file", "data_path": str(tmp_path / "digits.npy"),
                                      "file_reader": "read_npy",
                                      "data_read_postprocessing_fn": ["to_images", "scale_to_symmetric"],
                                      "data_read_postprocessing_fn_args": [{"size": 32}, {"low": 0, "high": 16}]}}
    x = load_streams(check_dataset(raw), 0, "cfg.yaml")["x"]
    assert x.shape == (3, 1, 32, 32) and x.min() >= -1 - 1e-5 and x.max() <= 1 + 1e-5
    expected = torch.nn.functional.interpolate(digits.unsqueeze(1), size=32, mode="bilinear", antialias=True)
    assert torch.allclose(x, expected / 8 - 1, atol=1e-5)


@pytest.mark.parametrize("fns, args, message", [
    (["to_images", "scale_to_symmetric"], [{"size": 32}], r"1 mapping\(s\) for 2 functions"),
    (["to_images", "scale_to_symmetric"], {"size": 32}, "give a list of one mapping each"),
    (["to_images", "scale_to_symmetric"], [{"sise": 32}, {}], r"args\[0\]\.sise: not an argument of to_images .*"
                                                              r"did you mean 'size'"),
    (["to_images", "scale_to_symetric"], [{}, {}], "scale_to_symetric.*did you mean 'scale_to_symmetric'"),
    ("to_images", [{}], "a list is for a list of functions"),
])
def test_postprocessing_list_errors(tmp_path, fns, args, message):
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8), np.float32))
    raw = {"data_len_key": "x", "x": {"data_read_type": "file", "data_path": str(tmp_path / "x.npy"),
                                      "file_reader": "read_npy", "data_read_postprocessing_fn": fns,
                                      "data_read_postprocessing_fn_args": args}}
    with pytest.raises(UserError, match=message):
        check_dataset(raw)


def test_to_images_repeats_a_channel_and_keeps_values_with_nearest():
    from dataset_functions import to_images
    masks = torch.randint(0, 4, (2, 4, 4)).float()
    out = to_images(masks, size=8, channels=3, mode="nearest")
    assert out.shape == (2, 3, 8, 8) and set(out.unique().tolist()) <= set(masks.unique().tolist())
    assert torch.equal(out[:, 0, ::2, ::2], masks) and torch.equal(out[:, 1], out[:, 0])
    with pytest.raises(ValueError, match="only a single channel is repeated"):
        to_images(torch.zeros(2, 2, 4, 4), channels=3)


# ---- the validation metrics ---------------------------------------------------------------------
def summed(kind, outputs, targets, value_range=None):
    sums = metrics.batch_sums(kind, outputs, targets, value_range)
    return metrics.finish({k: v.item() for k, v in sums.items()}, value_range)


def test_accuracy_and_top5_of_known_scores():
    scores = torch.arange(7.0).flip(0).repeat(4, 1)  # every sample ranks class 0 first, then 1, 2, ...
    labels = torch.tensor([0, 3, 5, 6])  # top 1: the first; among the top 5 (0..4): the first two
    result = summed("classes", scores, labels)
    assert result == {"accuracy": 0.25, "top5_accuracy": 0.5}
    assert metrics.names_of("classes", [7]) == ["accuracy", "top5_accuracy"]
    assert summed("classes", torch.eye(3), torch.tensor([0, 1, 0])) == {"accuracy": pytest.approx(2 / 3)}


def test_psnr_and_ssim_of_known_images():
    targets = torch.linspace(-0.9, 0.9, 2 * 16 * 16).view(2, 1, 16, 16)
    off = summed("images", targets + 0.1, targets, (-1.0, 1.0))  # (none past 1: nothing clamped)
    assert off["psnr"] == pytest.approx(10 * math.log10(4 / 0.01))  # peak 2 for [-1, 1]: 4 / MSE
    same = summed("images", targets, targets, (-1.0, 1.0))
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0)
    noisy = summed("images", targets + 0.5 * torch.randn(targets.shape, generator=torch.Generator().manual_seed(0)),
                   targets, (-1.0, 1.0))
    assert noisy["ssim"] < 0.9


def test_kind_of_outputs():
    labels, images = torch.tensor([0, 2]), torch.zeros(2, 1, 8, 8)
    assert metrics.kind_of([3], labels, paired=True) == "classes"
    assert metrics.kind_of([1, 8, 8], images, paired=True) == "images"
    assert metrics.kind_of([1, 8, 8], images, paired=False) is None  # a GAN's samples belong to no target
    assert metrics.kind_of([3], labels.float(), paired=True) is None


# ---- devices and threads ------------------------------------------------------------------------
def test_gpus_auto_on_a_machine_without_gpus_is_the_cpu(monkeypatch):
    from engine.cli import resolve_gpus, select_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_gpus("auto", 2) == [] and select_device("auto", "x").type == "cpu"
    assert resolve_gpus([1], 1) == [1]
    errors = []
    config.check_section({"gpus": "any"}, config.TRAINING["training"], "training", errors)
    assert any("training.gpus: 'any': must be auto or a list of GPU ids" in e for e in errors)


def test_num_threads_shares_cores_among_cpu_processes(monkeypatch):

    before = torch.get_num_threads()
    try:
        assert set_num_threads(1, Placement(torch.device("cpu"))) == 1
        torch.set_num_threads(4)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_num_threads(None, Placement(torch.device("cpu"), 0, 2, True)) == 2
    finally:
        torch.set_num_threads(before)


# ---- end to end: a classifier from a tree of PNGs -----------------------------------------------
TRAIN_YAML = """
training: {{n_epochs: 2, learning_rate: 0.003, batch_size: 32, gpus: auto, num_threads: 1}}
model: {{architecture_cfg_path: {arch}, model_flow_path: {flow}}}
loss: {{loss_fn: cross_entropy_loss}}
saving: {{save_filename_prefix: folders, save_folder_name: folders_run}}
dataset:
  data_len_key: images
  validation_fraction: 0.25
  images:
    data_read_type: folder
    data_path: {root}
    class_folders: true
    in_memory: {in_memory}
    file_reader: read_image
    file_reader_args: {{grayscale: true}}
  labels: {{data_read_type: class_labels, labels_of: images}}
  batch_transforms:
    - {{transform: normalize, args: {{mean: 0.5, std: 0.5}}, streams: [images], in_evaluation: true}}
"""


def shape_tree(root, images, labels, names):
    for i, (image, label) in enumerate(zip(images, labels)):
        path = root / names[label] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        torchvision.io.write_png(torch.from_numpy(image), str(path))


@pytest.mark.slow
def test_classifier_from_class_folders_end_to_end(repo, tmp_path):
    """The shape classifier trains from PNG folders (read batch by batch, gpus: auto on this
    CPU machine), logs validation accuracy every epoch, keeps the class names in its
    checkpoint; evaluate.py on a held-out tree reports accuracy per folder name, and refuses a
    tree of other classes without writing anything."""
    with np.load(SRC / "data/shape_classifier/shapes_16x16.npz") as archive:
        images, labels = archive["images"][:400], archive["labels"][:400]
    names = ["0_round", "1_box", "2_wedge"]  # not the flow's class_names: the folders' names win
    shape_tree(tmp_path / "train", images[:320], labels[:320], names)
    shape_tree(tmp_path / "test", images[320:], labels[320:], names)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(TRAIN_YAML.format(arch=ARCH, flow=FLOW, root=tmp_path / "train", in_memory="false"))
    proc = run(repo, "train.py", "-t", cfg)
    assert "device cpu" in proc.stdout
    folder = newest_run(repo / "models/shape_classifier/model_checkpoints/folders_run")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    accuracy = [row["validation/generator/accuracy"] for row in rows if "validation/generator/accuracy" in row]
    assert len(accuracy) == 2 and all(0 <= a <= 1 for a in accuracy)
    state = torch.load(sorted(folder.glob("*epoch2*.pth"))[0], weights_only=True)
    assert state["classes"] == {"labels": names}

    evaluation = tmp_path / "eval.yaml"
    evaluation.write_text("evaluation: {model_checkpoint_filename: latest, data_split: all, n_samples: 80}\n")
    test_tree = ["--set", f"dataset.images.data_path={tmp_path / 'test'}"]
    run(repo, "evaluate.py", "-t", cfg, "-e", evaluation, *test_tree)
    results = repo / "results/shape_classifier/folders_run" / folder.name
    (report,) = results.glob("*_all_*_metrics.json")
    measured = json.loads(report.read_text())
    assert list(measured["accuracy_per_class"]) == names and measured["n_samples"] == 80
    assert measured["class_counts"] == {name: int((labels[320:] == i).sum()) for i, name in enumerate(names)}
    written = sorted(results.iterdir())

    (tmp_path / "test" / "1_box").rename(tmp_path / "test" / "1_square")
    proc = run(repo, "evaluate.py", "-t", cfg, "-e", evaluation, *test_tree, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"dataset.images.data_path: {tmp_path / 'test'} has the class folders" in proc.stderr
    assert "lacks ['1_box'], has ['1_square'] besides" in proc.stderr
    assert sorted(results.iterdir()) == written
