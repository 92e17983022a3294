"""The class-conditional GAN example (models/cond_gan): a flow that writes its own step, labels as an
integer stream into an Embedding, a sample picture of a row per class. Its README commands run end
to end on a few of the shapes: train, resume bit for bit, evaluate, trace, plot the curves."""
import json

import pytest
import torch

import config
import model_base
from conftest import SRC, checkpoints, newest_run, run, run_folder_of

CFG = "configs/cond_gan/cond_gan_training_cfg.yaml"
EVAL_CFG = "configs/cond_gan/cond_gan_evaluation_cfg.yaml"
TRAIN_EVAL_CFG = "configs/cond_gan/cond_gan_training_evaluation_cfg.yaml"
SMALL = ["dataset.images.n_inputs=256", "dataset.labels.n_inputs=256", "dataset.noise.n_inputs=256",
         "training.batch_size=64", "logging.tensorboard=false", "saving.save_epoch_increment=1"]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def sets(*items):
    return [x for item in items for x in ("--set", item)]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def cond_run(repo):
    """Two epochs straight, and one epoch resumed to two by the same command (latest)."""
    straight = run_folder_of(run(repo, "train.py", "-t", CFG, *sets(*SMALL, "training.n_epochs=2",
                                                                    "saving.save_folder_name=straight")))
    halves = [*SMALL, "saving.save_folder_name=halves", "model.model_checkpoint_filename=latest"]
    run(repo, "train.py", "-t", CFG, *sets(*halves, "training.n_epochs=1"))
    run(repo, "train.py", "-t", CFG, *sets(*halves, "training.n_epochs=2"))
    return repo, straight, newest_run(repo / "models/cond_gan/model_checkpoints/halves")


@pytest.mark.slow
def test_the_conditional_gan_trains_and_resumes_bit_for_bit(cond_run):
    _, straight, halves = cond_run
    a, b = load(checkpoints(straight)[-1]), load(checkpoints(halves)[-1])
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
    assert a["loss_history"] == b["loss_history"]
    assert set(a["networks"]) == {"discriminator", "generator"}
    history = a["loss_history"]
    assert set(history["discriminator"]) == {"total", "real", "fake", "accuracy"}  # accuracy: watched
    assert set(history["generator"]) == {"total", "adversarial"}
    assert len(history["generator"]["total"]) == 8  # 256 shapes in batches of 64, two epochs


@pytest.mark.slow
def test_the_conditional_gan_evaluates_traces_and_plots(cond_run):
    repo, straight, _ = cond_run
    args = ["-t", CFG, *sets(*SMALL, "saving.save_folder_name=straight")]
    evaluated = run(repo, "evaluate.py", *args, "-e", EVAL_CFG)
    pictures = sorted(path.name for path in (repo / "results/cond_gan/straight").rglob("*.png"))
    assert any(name.endswith("_rows.png") for name in pictures), pictures  # CondGAN.sample_rows' picture
    assert any(name.endswith("_samples.png") for name in pictures), pictures
    metrics = json.loads(next((repo / "results/cond_gan/straight").rglob("*_metrics.json")).read_text())
    assert metrics["epoch"] == 2, evaluated.stdout
    traced = run(repo, "jit_trace_model.py", *args, "-c", "latest", "-i", "2")
    assert (straight / "jit").is_dir(), traced.stdout
    run(repo, "evaluate_training.py", "-te", TRAIN_EVAL_CFG, *sets("training_evaluation.runs=all"), check=True)


def test_the_sample_rows_are_a_row_per_class_from_the_same_noise():
    cfg = config.load_training_config(SRC / CFG)
    torch.manual_seed(0)
    model = model_base.build_model(cfg["model"]).eval()
    batch = {"noise": torch.randn(8, 32), "labels": torch.zeros(8, dtype=torch.long)}
    with torch.no_grad():
        rows = model.sample_rows(batch)
        triangles = model(torch.full((8,), 2), batch["noise"])
    assert list(rows) == ["circle", "square", "triangle"]
    assert all(images.shape == (8, 1, 16, 16) for images in rows.values())
    assert torch.equal(rows["triangle"], triangles)  # the class is the row's, whatever the batch's labels
    assert not torch.equal(rows["circle"], rows["square"])
    assert model.input_keys == ("labels", "noise")
