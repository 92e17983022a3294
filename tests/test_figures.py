"""Figures are right or absent, never silently wrong: PSNR and SSIM on the declared range of the
data (the outputs clamped to it, and the output saying so), strict JSON with null and a reason
for what is not finite, a picture or a reason for every kind of output, and a discriminator score
only where there is one score a sample. (Found porting models: a pix2pix reported 60.6 dB for
18.4, its bicubically resized targets having been taken for 8-bit values.)

In-process on tiny tensors, but for two end-to-end runs marked slow.
"""
import contextlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch

import dataset_functions
import evaluate
from conftest import run_all
from dataset_base import ValueRange, value_range
from engine import config, metrics, registry
from engine.errors import UserError
from engine.validation import validation_means

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

SHAPES = "data/unet_gan/shapes_32x32.npy"
SYMMETRIC = ValueRange(-1.0, 1.0, "declared by a test", True)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UNET_CFG = "configs/unet_gan/unet_gan_training_cfg.yaml"
UNET_EVAL_CFG = "configs/unet_gan/unet_gan_evaluation_cfg.yaml"


def npy(**keys):
    """A stream read with read_npy (which declares no range: a .npy file holds anything)."""
    return {"data_read_type": "file", "data_path": SHAPES, "file_reader": "read_npy", **keys}


def dataset(batch_transforms=(), **streams):
    """A validated dataset section of `streams` ({name: its keys}), as a training config holds it."""
    errors = []
    checked = config.check_dataset({"data_len_key": next(iter(streams)), "batch_transforms": list(batch_transforms),
                                    **streams}, "dataset", errors)
    assert not errors, errors
    return checked


def psnr_by_hand(outputs, targets, low, high):
    """PSNR in dB of the outputs clamped to [low, high] (not the targets), peak high - low, in float64."""
    o, t = outputs.double().numpy(), targets.double().numpy()
    return 10 * np.log10((high - low) ** 2 / np.mean((np.clip(o, low, high) - t) ** 2))


def overshooting_targets(seed=0):
    """pix2pix's targets: images in [-1, 1] (scale_to_symmetric) resized bicubically (to_images),
    which overshoots the range at hard edges; and outputs overshooting it further."""
    g = torch.Generator().manual_seed(seed)
    small = (torch.rand(4, 1, 4, 4, generator=g) > 0.5).float()
    targets = dataset_functions.to_images(dataset_functions.scale_to_symmetric(small), size=12, mode="bicubic")
    outputs = targets + 0.3 * torch.randn(targets.shape, generator=g)
    return outputs, targets


def quality(outputs, targets, value_range):
    sums = metrics.batch_sums("images", outputs, targets, value_range)
    return metrics.finish({k: v.item() for k, v in sums.items()}, value_range)


# ---- the range: declared by the key, by a function, else guessed ------------------------------
def test_pix2pix_targets_past_their_range_give_the_psnr_of_the_clamped_outputs():
    """The issue's case: the bicubic resize overshoots [-1, 1]. The range is still the one
    scale_to_symmetric declares (to_images keeps it), the peak 2, not 255; the outputs, not the
    targets, are clamped to it; evaluate.py's PSNR is the one computed by hand, and says how."""
    outputs, targets = overshooting_targets()
    assert targets.max() > 1 and targets.min() < -1 and outputs.max() > targets.max()
    data = dataset(targets=npy(data_read_postprocessing_fn=["scale_to_symmetric", "to_images"],
                               data_read_postprocessing_fn_args=[{}, {"size": 12, "mode": "bicubic"}]))
    found = value_range(data, "targets", targets)
    assert found[:2] == (-1.0, 1.0) and found.declared
    assert found.how == "declared by scale_to_symmetric (dataset.targets.data_read_postprocessing_fn)"
    notes = []
    result = evaluate.compute_metrics(None, torch.zeros(4, 3), outputs, targets, "cpu", True, False, None, found, notes)
    by_hand = psnr_by_hand(outputs, targets, -1.0, 1.0)
    assert result["psnr_db"] == pytest.approx(by_hand, abs=1e-4)
    assert 0 < result["ssim"] < 1
    assert result["value_range"] == [-1.0, 1.0] and result["value_range_how"] == found.how
    o = outputs.numpy()
    assert 0 < result["outputs_clamped"] == pytest.approx(np.mean((o < -1) | (o > 1)))
    assert notes == []  # declared: nothing to say
    # the MSE and L1 are of the outputs as they are
    assert result["mse"] == pytest.approx(((outputs - targets) ** 2).mean().item())
    # unclamped, the same outputs score lower: the clamp is not a no-op here
    assert 10 * math.log10(4 / result["mse"]) < by_hand


def test_validation_clamps_the_outputs_as_evaluate_does():
    """validation_means (the rows validation/generator/psnr and ssim) on the same
    outputs gives the PSNR by hand; without a known range it gives neither PSNR nor SSIM."""
    outputs, targets = overshooting_targets(1)

    class Model(torch.nn.Identity):
        def split_batch(self, batch):
            return batch["inputs"], batch["targets"]

    class Losses:  # what validation_means asks of Losses: the outputs, and a loss term
        model, wants_discriminator, own_step = Model(), False, False

        def to_device(self, batch):
            return batch

        def forward(self, inputs):
            return outputs

        def __call__(self, name, batch, step):
            return torch.tensor(0.0), {}

    placement = SimpleNamespace(device=torch.device("cpu"), world_size=1)
    networks = {"generator": SimpleNamespace(autocast=contextlib.nullcontext)}
    batches = [{"inputs": targets, "targets": targets}]
    _, found = validation_means(Losses(), batches, networks, placement, True, SYMMETRIC)
    assert found["psnr"] == pytest.approx(psnr_by_hand(outputs, targets, -1.0, 1.0), abs=1e-4)
    assert found["ssim"] == pytest.approx(quality(outputs, targets, SYMMETRIC)["ssim"])
    unknown = ValueRange(None, None, "not known: a test")
    assert validation_means(Losses(), batches, networks, placement, True, unknown)[1] == {}


def test_targets_that_overshoot_slightly_are_guessed_onto_their_range_not_255():
    """Nothing declares a .npy file's range: the guess tolerates a small overshoot ([-1.04, 1.04]
    is [-1, 1], not [0, 255]), and the output says it was guessed and which key declares it."""
    targets = torch.linspace(-1.04, 1.04, 4 * 12 * 12).view(4, 1, 12, 12)
    found = value_range(dataset(targets=npy()), "targets", targets)
    assert found[:2] == (-1.0, 1.0) and not found.declared
    assert "guessed" in found.how and "dataset.targets.value_range" in found.how
    notes = []
    result = evaluate.compute_metrics(None, torch.zeros(4, 3), targets * 0.5, targets, "cpu", True, False, None,
                                      found, notes)
    assert result["psnr_db"] == pytest.approx(psnr_by_hand(targets * 0.5, targets, -1.0, 1.0), abs=1e-4)
    assert "guessed" in result["value_range_how"] and any("dataset.targets.value_range" in n for n in notes)
    # whole numbers to 255 are 8-bit values; the key, where set, wins over any guess or function
    assert value_range(dataset(targets=npy()), "targets", torch.arange(256.0).view(1, 1, 16, 16))[:2] == (0, 255)
    keyed = value_range(dataset(targets=npy(value_range=[0, 4], data_read_postprocessing_fn="scale_to_symmetric")),
                        "targets", targets)
    assert keyed == (0.0, 4.0, "declared by dataset.targets.value_range", True)


def test_without_a_range_psnr_and_ssim_are_null_with_the_reason():
    """Values that fit no usual range, and nothing declared: no PSNR or SSIM rather than a wrong one."""
    targets = torch.linspace(-3, 7, 4 * 12 * 12).view(4, 1, 12, 12)
    found = value_range(dataset(targets=npy()), "targets", targets)
    assert not found.known and "dataset.targets.value_range" in found.how
    result = evaluate.pairwise_metrics(targets * 0.9, targets, found)
    assert result["psnr_db"] is None and "dataset.targets.value_range" in result["psnr_db_reason"]
    assert result["ssim"] is None and result["ssim_reason"] == result["psnr_db_reason"]
    assert result["mse"] > 0  # (what needs no range is still there)
    assert metrics.names_of("images", [1, 12, 12], found) == []  # validation logs neither
    assert metrics.names_of("images", [1, 12, 12], SYMMETRIC) == ["psnr", "ssim"]


FOLDER = {"data_read_type": "folder", "data_path": "data/unet_gan", "file_reader": "read_image"}
GENERATED = {"data_read_type": "function", "n_inputs": 4}


@pytest.mark.parametrize("stream, transforms, expected", [
    (npy(), [], None),  # a .npy file holds anything
    (GENERATED | {"data_generating_function": "shapes"}, [], (-1, 1)),
    (GENERATED | {"data_generating_function": "blobs"}, [], (-1, 1)),
    (GENERATED | {"data_generating_function": "random_normal"}, [], None),  # noise
    (FOLDER, [], (0, 1)),  # read_image as float32
    (FOLDER | {"file_reader_args": {"dtype": "uint8"}}, [], (0, 255)),
    (FOLDER | {"file_reader_args": {"dtype": "uint8"}}, [{"transform": "to_float", "in_evaluation": True}], (0, 1)),
    (FOLDER | {"file_reader_args": {"dtype": "uint8"}}, [{"transform": "to_float"}], (0, 255)),  # training only
    (FOLDER, [{"transform": "normalize", "args": {"mean": 0.5, "std": 0.25}, "in_evaluation": True}], None),
    (FOLDER, [{"transform": "Normalize", "args": {"mean": [0.5], "std": [0.25]}, "in_evaluation": True}], None),
    (FOLDER, [{"transform": "RandomCrop", "args": {"size": 4}, "in_evaluation": True}], (0, 1)),  # keeps it
    (npy(data_read_postprocessing_fn=["scale_to_symmetric", "add_fixed_noise"],
         data_read_postprocessing_fn_args=[{}, {}]), [], (-1, 1)),  # noise added keeps the range
])
def test_the_range_a_streams_functions_declare(stream, transforms, expected):
    transforms = [{"streams": ["x"], **entry} for entry in transforms]
    found = value_range(dataset(transforms, x=stream), "x")  # (no values: nothing to guess from)
    assert (found[:2] if found.known else None) == expected
    assert found.declared == (expected is not None)


def test_a_declaration_of_ones_own_function_is_checked(monkeypatch):
    """A user's own function declares its range by an attribute; a wrong declaration is a user
    error naming the function, not a figure on a wrong scale."""
    def to_percent(data):
        return data * 100

    to_percent.value_range = (0.0, 100.0)
    monkeypatch.setitem(registry.dataset_functions(), "to_percent", to_percent)  # as if defined in dataset_functions.py
    data = dataset(x=npy(data_read_postprocessing_fn="to_percent"))
    assert value_range(data, "x") == (0.0, 100.0, "declared by to_percent (dataset.x.data_read_postprocessing_fn)",
                                      True)
    to_percent.value_range = (100.0, 0.0)
    with pytest.raises(UserError, match=r"dataset.x.data_read_postprocessing_fn: to_percent: .*to_percent.value_range "
                                        r"gives \(100.0, 0.0\)"):
        value_range(data, "x")


# ---- the key -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[1, -1], [0, 0], [0], [0, 1, 2], ["a", 1], [0, math.inf], [math.nan, 1], [True, 2],
                                 "0, 1", 5])
def test_a_value_range_that_is_no_range_is_refused_naming_the_key(bad):
    errors = []
    config.check_dataset({"data_len_key": "x", "x": npy(value_range=bad)}, "dataset", errors)
    assert len(errors) == 1 and errors[0].startswith("dataset.x.value_range: "), errors


# ---- strict JSON -------------------------------------------------------------------------------
def test_infinite_and_nan_metrics_are_null_with_their_reason_in_strict_json():
    """An autoencoder's inputs are its targets: input PSNR is infinite. JSON has no Infinity."""
    targets = torch.linspace(-0.9, 0.9, 2 * 12 * 12).view(2, 1, 12, 12)
    found = evaluate.compute_metrics(None, targets.clone(), targets * 0.5, targets, "cpu", True, False, None,
                                     SYMMETRIC, [])
    assert found["input_psnr_db"] is None and found["input_psnr_db_reason"] == \
        "identical to the targets: PSNR is infinite"
    assert found["input_mse"] == 0 and math.isfinite(found["psnr_db"])
    json.loads(json.dumps(evaluate.strict(found), allow_nan=False))
    # outputs of NaN (a diverged model): every figure of them null, with the reason, still strict JSON
    broken = evaluate.strict(evaluate.compute_metrics(None, targets, torch.full_like(targets, math.nan), targets,
                                                      "cpu", True, False, None, SYMMETRIC, []))
    text = json.dumps(broken, allow_nan=False)
    assert broken["output_mean"] is None and broken["output_mean_reason"] == "not a finite number (nan)"
    assert broken["psnr_db"] is None and "nan" in broken["psnr_db_reason"]
    assert "NaN" not in text and "Infinity" not in text


# ---- pictures ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 12, 12), (1, 12, 12), (3, 12, 12), (11, 6, 6), (1, 1, 1), (40,), (2, 40)])
def test_every_kind_of_output_gets_a_picture(tmp_path, shape):
    """2-channel images (each channel grey), any number of channels, and 1-D signals."""
    g = torch.Generator().manual_seed(0)
    targets = torch.rand(5, *shape, generator=g) * 2 - 1
    outputs = targets + 0.2 * torch.randn(targets.shape, generator=g)
    notes = []
    figures = evaluate.sample_pictures(targets + 0.5, outputs, targets, 4, "test", SYMMETRIC, notes)
    assert list(figures) == ["samples"] and notes == []
    path = tmp_path / "samples.png"
    figures["samples"].savefig(path)
    plt.close(figures["samples"])
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("shape, said", [((), "one value"), ((1,), "one value"), ((2, 3, 4, 5), "[2, 3, 4, 5]")])
def test_outputs_without_a_picture_say_why(shape, said):
    notes = []
    outputs = torch.rand(4, *shape)
    assert evaluate.sample_pictures(None, outputs, None, 4, "test", SYMMETRIC, notes) == {}
    assert len(notes) == 1 and notes[0].startswith("no samples picture: ") and said in notes[0]


def test_class_scores_of_inputs_that_are_no_images_say_why():
    notes = []
    inputs, predicted, labels = torch.rand(6, 40), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 1, 0, 2, 2])
    assert evaluate.labelled_pictures(inputs, predicted, labels, ["a", "b", "c"], 4, "test", SYMMETRIC, notes) == {}
    assert len(notes) == 1 and "[40]" in notes[0] and "confusion matrix" in notes[0]


# ---- the discriminator's score -----------------------------------------------------------------
class Critic:
    """A flow whose discriminate gives `shape` scores per sample: the sample's mean in each."""
    def __init__(self, shape):
        self.shape = shape

    def discriminate(self, samples, inputs=None):
        means = samples.flatten(1).mean(1)
        return means.view(-1, *[1] * len(self.shape)).expand(-1, *self.shape)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1)])  # (the last: a DCGAN's final 4x4 convolution)
def test_one_discriminator_score_a_sample_is_reported(shape):
    targets, notes = torch.rand(4, 1, 8, 8), []
    found = evaluate.compute_metrics(Critic(shape), targets, targets * 0.5, targets, "cpu", True, True, None,
                                     SYMMETRIC, notes)
    assert found["discriminator_score_real"] == pytest.approx(targets.mean().item())
    assert found["discriminator_score_generated"] == pytest.approx(targets.mean().item() / 2)
    assert notes == []


def test_a_patchgan_map_of_scores_is_no_discriminator_score():
    targets, notes = torch.rand(4, 1, 8, 8), []
    found = evaluate.compute_metrics(Critic((1, 4, 4)), targets, targets * 0.5, targets, "cpu", True, True, None,
                                     SYMMETRIC, notes)
    assert not any(key.startswith("discriminator_score") for key in found)
    assert len(notes) == 1 and "[1, 4, 4] scores per sample" in notes[0]


# ---- end to end --------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_autoencoder_evaluates_to_strict_json_with_its_reasons(repo, tmp_path):
    """The U-Net with its noise switched off is an autoencoder (its inputs are its targets): its
    metrics JSON is strict, with input_psnr_db null and why, the PatchGAN's scores left out and
    why (also printed), and the range of PSNR the config declares."""
    tiny = [x for item in ("dataset.noisy_images.n_inputs=16", "dataset.clean_images.n_inputs=16",
                           "dataset.batch_transforms=[]", "training.n_epochs=1", "training.batch_size=8",
                           "saving.save_folder_name=autoencoder", "evaluation.n_samples=4") for x in ("--set", item)]
    trained, proc = run_all(repo, {"train": ["train.py", "-t", UNET_CFG, *tiny[:-2]],  # one after the other
                                   "evaluate": ["evaluate.py", "-t", UNET_CFG, "-e", UNET_EVAL_CFG, *tiny]},
                            ).values()
    assert trained.returncode == 0 and proc.returncode == 0, trained.stderr + proc.stderr
    assert "validation psnr, ssim: clean_images on [-1, 1], declared by dataset.clean_images.value_range; " \
           "outputs clamped to it" in trained.stdout
    [saved] = [Path(line.removeprefix("saved ")) for line in proc.stdout.splitlines() if line.endswith("_metrics.json")]

    def refuse(constant):
        raise AssertionError(f"{constant} in the metrics JSON")

    found = json.loads(saved.read_text(), parse_constant=refuse)
    assert found["input_psnr_db"] is None and found["input_psnr_db_reason"] == \
        "identical to the targets: PSNR is infinite"
    assert found["value_range"] == [-1, 1] and found["value_range_how"] == \
        "declared by dataset.clean_images.value_range"
    assert math.isfinite(found["psnr_db"]) and 0 <= found["outputs_clamped"] <= 1
    assert "discriminator_score_real" not in found and any("PatchGAN" in note for note in found["notes"])
    assert "note: no discriminator_score_real" in proc.stdout
    assert saved.with_name(saved.name.replace("_metrics.json", "_samples.png")).read_bytes()[:8] == PNG_MAGIC
