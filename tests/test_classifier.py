"""The shape classifier example: its data, its loss, its metrics, and its four commands end to end.

The scripts run in a subprocess inside the session's copy of the repository (conftest's `repo`),
so the run folders they write never land in the working tree. The training run is short (2
epochs of the shipped config); the three scripts that read it then run side by side.
"""
import importlib.util
import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
import loss
from conftest import SRC, checkpoints, newest_run, run
from engine.errors import UserError

CFG = "configs/shape_classifier/shape_classifier_training_cfg.yaml"
EVAL_CFG = "configs/shape_classifier/shape_classifier_evaluation_cfg.yaml"
TRAIN_EVAL_CFG = "configs/shape_classifier/shape_classifier_training_evaluation_cfg.yaml"
DATA = "data/shape_classifier/shapes_16x16.npz"
RUN = "shapes_run"  # the config's saving.save_folder_name
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_VALIDATION = 300  # validation_fraction 0.1 of 3000 images
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def sets(*items):
    return [x for item in items for x in ("--set", item)]


def load_make_data():
    """models/shape_classifier/make_data.py as a module (it is a script, outside any package)."""
    spec = importlib.util.spec_from_file_location("shape_classifier_make_data",
                                                  SRC / "models/shape_classifier/make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the data -----------------------------------------------------------------------------------
def test_shipped_data_is_what_make_data_makes():
    """The shipped archive is make_data's output for its default seed, in the documented layout.
    make() draws each random quantity for all samples at once, so a smaller N would give other
    images; regenerating all 3000 takes a few milliseconds, and the whole file is compared."""
    make_data = load_make_data()
    with np.load(SRC / DATA) as archive:
        assert sorted(archive.files) == ["images", "labels"]
        images, labels = archive["images"], archive["labels"]
    assert images.dtype == np.uint8 and images.shape == (make_data.N_SAMPLES, 1, 16, 16)
    assert labels.dtype == np.int64 and labels.shape == (make_data.N_SAMPLES,)
    made_images, made_labels = make_data.make()
    np.testing.assert_array_equal(images[:16], made_images[:16])  # the first samples, for a readable failure
    np.testing.assert_array_equal(images, made_images)
    np.testing.assert_array_equal(labels, made_labels)
    counts = np.bincount(labels, minlength=3)
    assert len(counts) == 3 and counts.min() > 0.3 * len(labels)  # about a third each
    assert (SRC / DATA).stat().st_size < 200_000


def test_make_data_labels_are_the_kinds_drawn():
    """Each image shows one shape, and its label says which: a square fills its bounding box, a
    circle about pi/4 of it and a triangle about half (on average over shapes of at least 6x6
    pixels; pixelation makes single small ones vary)."""
    images, labels = load_make_data().make(n_samples=200, seed=3)
    lit = images[:, 0] > 0
    assert lit.any(axis=(1, 2)).all()
    box = lit.any(2).sum(1) * lit.any(1).sum(1)
    fill = lit.sum((1, 2)) / box
    assert (fill[labels == 1] == 1).all()
    large = box >= 36
    assert 0.72 < fill[large & (labels == 0)].mean() < 0.86
    assert 0.5 < fill[large & (labels == 2)].mean() < 0.62


# ---- the loss and the metrics ------------------------------------------------------------------
def test_cross_entropy_loss_is_torch_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3, generator=generator)
    labels = torch.randint(0, 3, (8,), generator=generator)
    terms = loss.cross_entropy_loss("generator", logits, labels)
    assert list(terms) == ["cross_entropy"]
    assert torch.equal(terms["cross_entropy"], F.cross_entropy(logits, labels))
    smoothed = loss.cross_entropy_loss("generator", logits, labels, None, None, label_smoothing=0.2)
    assert torch.equal(smoothed["cross_entropy"], F.cross_entropy(logits, labels, label_smoothing=0.2))
    logits.requires_grad_(True)
    loss.cross_entropy_loss("generator", logits, labels)["cross_entropy"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_classification_metrics_of_known_predictions():
    """Labels 0, 0, 1, 1, 2, 2 predicted as 0, 1, 1, 1, 2, 0: the confusion matrix's rows are
    true classes, its columns predicted ones."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = F.one_hot(torch.tensor([0, 1, 1, 1, 2, 0]), 3).float() * 5 - 1
    assert evaluate.is_classification(logits, labels)
    metrics = evaluate.classification_metrics(logits, labels, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["n_classes"] == 3
    assert metrics["accuracy_per_class"] == {"a": 0.5, "b": 1.0, "c": 0.5}
    assert metrics["class_counts"] == {"a": 2, "b": 2, "c": 2}
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # a class absent from the evaluated samples has no accuracy (null in the json)
    assert evaluate.classification_metrics(logits[:4], labels[:4], ["a", "b", "c"])["accuracy_per_class"]["c"] is None
    with pytest.raises(UserError, match="class labels from 0 to 3"):
        evaluate.classification_metrics(logits, torch.tensor([0, 1, 2, 3, 0, 1]), ["a", "b", "c"])


def test_paired_and_gan_outputs_are_not_taken_for_classification():
    images = torch.zeros(4, 1, 4, 4)
    assert not evaluate.is_classification(images, images)  # a denoiser's image targets
    assert not evaluate.is_classification(torch.zeros(4, 3), None)  # no targets
    assert not evaluate.is_classification(torch.zeros(4, 3), torch.zeros(4))  # float regression targets
    assert not evaluate.is_classification(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.int64))


# ---- the four commands --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_run(repo):
    """Train the shipped config for 2 epochs, then evaluate it, plot its losses and trace it, the
    last three side by side: {script: CompletedProcess}, with the repository copy."""
    run(repo, "train.py", "-t", CFG, *sets("training.n_epochs=2"))
    jobs = {"evaluate.py": ["evaluate.py", "-t", CFG, "-e", EVAL_CFG],
            "evaluate_training.py": ["evaluate_training.py", "-te", TRAIN_EVAL_CFG],
            "jit_trace_model.py": ["jit_trace_model.py", "-t", CFG, "-c", "latest", "-i", "1", "1", "16", "16"]}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run, repo, *args) for name, args in jobs.items()}
        return repo, {name: f.result() for name, f in futures.items()}


@pytest.mark.slow
def test_classifier_trains_with_a_validation_split(classifier_run):
    repo, _ = classifier_run
    folder = newest_run(repo / "models/shape_classifier/model_checkpoints" / RUN)
    latest = checkpoints(folder)[-1]
    state = torch.load(latest, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    assert "cross_entropy" in state["loss_history"]["generator"]
    validation = state["validation_history"]["generator"]["cross_entropy"]
    assert len(validation) == 2 and validation[-1] < np.log(3)  # below a uniform guess's loss


@pytest.mark.slow
def test_classifier_evaluates_on_the_held_out_images(classifier_run):
    repo, procs = classifier_run
    run_folder = newest_run(repo / "models/shape_classifier/model_checkpoints" / RUN)
    out = repo / "results/shape_classifier" / RUN / run_folder.name  # the run's own results
    [metrics_path] = out.glob("*_metrics.json")
    stem = metrics_path.name[:-len("_metrics.json")]  # <checkpoint>_<split>_<settings hash>
    assert re.fullmatch(r".+_validation_[0-9a-f]{8}", stem), metrics_path.name
    metrics = json.loads(metrics_path.read_text())
    assert metrics["data_split"] == "validation" and metrics["n_samples"] == N_VALIDATION
    assert metrics["evaluation"]["data_split"] == "validation"
    assert metrics["accuracy"] > 0.6  # chance is 1/3; two epochs reach far more
    assert metrics["n_classes"] == 3 and set(metrics["accuracy_per_class"]) == {"circle", "square", "triangle"}
    assert sum(metrics["class_counts"].values()) == N_VALIDATION
    assert np.array(metrics["confusion_matrix"]).sum() == N_VALIDATION
    assert "l1" not in metrics and "psnr_db" not in metrics  # no pairwise image metrics for labels
    for picture in (f"{stem}_confusion.png", f"{stem}_samples.png"):
        assert (out / picture).read_bytes()[:8] == PNG_MAGIC
        assert any(line.startswith("saved ") and line.endswith(picture)
                   for line in procs["evaluate.py"].stdout.splitlines())
    assert (out / "training_losses.png").read_bytes()[:8] == PNG_MAGIC
    assert "cross_entropy" in procs["evaluate_training.py"].stdout


@pytest.mark.slow
def test_classifier_traces(classifier_run):
    repo, _ = classifier_run
    jit = newest_run(repo / "models/shape_classifier/model_checkpoints" / RUN) / "jit"
    [traced] = jit.glob("*_1x1x16x16_traced.pt")  # <checkpoint>_<input shape>_traced.pt
    model = torch.jit.load(traced)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 3)
