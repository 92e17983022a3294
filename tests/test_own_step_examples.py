"""The examples whose flows write their own step: the class-conditional GAN (models/cond_gan:
labels as an integer stream into an Embedding, a sample picture of a row per class) and the
CycleGAN (models/cycle_gan: two generators and two discriminators, cycle and identity terms, a
history of fakes kept as buffers) and the VAE (models/vae: one network, the reparameterisation
trick, two inference paths exported). Their README commands run end to end on a few of the shapes:
train, resume bit for bit, evaluate, trace, plot the curves."""
import json

import pytest
import torch
from tqdm import tqdm

import train
from conftest import SRC, checkpoints, newest_run, run_all, run_folder_of
from engine import config, loop, model_base, preflight, runs
from engine.placement import Placement
from engine.sampling import first_samples

EXAMPLES = {  # model: the overrides that make its run small (4 steps an epoch)
    "cond_gan": ["dataset.images.n_inputs=256", "dataset.labels.n_inputs=256", "dataset.noise.n_inputs=256",
                 "training.batch_size=64"],
    "cycle_gan": ["dataset.domain_a.n_inputs=64", "dataset.domain_b.n_inputs=64", "training.batch_size=16"],
    "vae": ["dataset.images.n_inputs=256", "training.batch_size=64"],  # (230 training samples: 4 steps)
}
COMMON = ["logging.tensorboard=false", "saving.save_epoch_increment=1"]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def cfg_path(model, kind="training"):
    return f"configs/{model}/{model}_{kind}_cfg.yaml"


def sets(*items):
    return [x for item in items for x in ("--set", item)]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def checked(done):
    """The CompletedProcesses of run_all, each having exited 0 (else the test fails, showing it)."""
    for name, proc in done.items():
        if proc.returncode != 0:
            pytest.fail(f"{name}: {' '.join(proc.args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}",
                        pytrace=False)
    return done


@pytest.fixture(scope="module")
def trained_examples(repo, tmp_path_factory):
    """Each example trained two epochs straight (in the config's own save folder, which
    evaluate_training.py reads), and one epoch resumed to two by the same command (latest): every
    first run side by side (conftest.run_all), then the
    resumes. {model: (straight run folder, resumed run folder)}."""
    small = {model: [*overrides, *COMMON] for model, overrides in EXAMPLES.items()}
    halves = {model: [*args, "saving.save_folder_name=halves", "model.model_checkpoint_filename=latest"]
              for model, args in small.items()}
    first = {f"{model}-straight": ["train.py", "-t", cfg_path(model), *sets(*args, "training.n_epochs=2")]
             for model, args in small.items()}
    first |= {f"{model}-half": ["train.py", "-t", cfg_path(model), *sets(*args, "training.n_epochs=1")]
              for model, args in halves.items()}
    done = checked(run_all(repo, first))
    checked(run_all(repo, {model: ["train.py", "-t", cfg_path(model), *sets(*args, "training.n_epochs=2")]
                           for model, args in halves.items()}))
    return {model: (run_folder_of(done[f"{model}-straight"]),
                    newest_run(repo / f"models/{model}/model_checkpoints/halves")) for model in EXAMPLES}


@pytest.fixture(scope="module")
def used_examples(repo, trained_examples, tmp_path_factory):
    """evaluate.py, jit_trace_model.py (the VAE's sampler too) and evaluate_training.py on each
    example's straight run, side by side: {job: CompletedProcess}."""
    jobs = {}
    for model in EXAMPLES:
        args = ["-t", cfg_path(model), *sets(*EXAMPLES[model], *COMMON)]
        jobs[f"{model}-evaluate"] = ["evaluate.py", *args, "-e", cfg_path(model, "evaluation")]
        jobs[f"{model}-trace"] = ["jit_trace_model.py", *args, "-c", "latest", "-i", "2"]
        jobs[f"{model}-curves"] = ["evaluate_training.py", "-te", cfg_path(model, "training_evaluation")]
    jobs["vae-trace-sample"] = ["jit_trace_model.py", "-t", cfg_path("vae"), *sets(*EXAMPLES["vae"], *COMMON), "-c",
                                "latest", "-i", "2", "--path", "sample", "--dynamic-batch"]
    return checked(run_all(repo, jobs))


@pytest.fixture(params=list(EXAMPLES))
def example_run(request, repo, trained_examples):
    return request.param, repo, *trained_examples[request.param]


@pytest.mark.slow
def test_an_own_step_example_trains_and_resumes_bit_for_bit(example_run):
    model, _, straight, halves = example_run
    a, b = load(checkpoints(straight)[-1]), load(checkpoints(halves)[-1])
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
    assert a["loss_history"] == b["loss_history"]
    history = a["loss_history"]
    if model == "cond_gan":
        assert set(history["discriminator"]) == {"total", "real", "fake", "accuracy"}  # accuracy: watched
        assert set(history["generator"]) == {"total", "adversarial"}
        assert len(history["generator"]["total"]) == 8  # 4 steps an epoch, two epochs
    elif model == "vae":
        assert set(history) == {"generator"} and set(history["generator"]) == {"total", "reconstruction", "kl"}
        assert len(history["generator"]["total"]) == 8
    else:
        assert set(history) == {"generators", "discriminators"}
        assert set(history["generators"]) == {"total", "adversarial_ab", "adversarial_ba", "cycle", "identity"}
        # the history of fakes filled as training showed them: 8 steps of 16, up to its 50
        assert a["model_state_dict"]["pooled_a"] == 50 and a["model_state_dict"]["pool_b"].abs().sum() > 0


@pytest.mark.slow
def test_an_own_step_example_evaluates_traces_and_plots(example_run, used_examples):
    model, repo, straight, _ = example_run
    results = repo / "results" / model / straight.parent.name
    pictures = sorted(path.name for path in results.rglob("*.png"))
    assert any(name.endswith("_rows.png") for name in pictures), pictures  # the flow's sample_rows picture
    assert any(name.endswith("_samples.png") for name in pictures), pictures
    metrics = json.loads(next(results.rglob("*_metrics.json")).read_text())
    assert metrics["epoch"] == 2, used_examples[f"{model}-evaluate"].stdout
    assert len(pictures) > 2, used_examples[f"{model}-curves"].stdout  # the loss curves' figure(s) too
    assert list((straight / "jit").glob("*_2x*_traced.pt")) or list((straight / "jit").glob("*-2*_traced.pt"))
    if model == "vae":  # its second inference path: latent codes in, images out
        assert list((straight / "jit").glob("*_sample_Nx8_traced.pt"))


def test_the_cycle_gans_trial_step_leaves_its_history_of_fakes_empty(tmp_path):
    cfg = config.load_training_config(SRC / cfg_path("cycle_gan"), [*EXAMPLES["cycle_gan"], *COMMON])
    model = model_base.build_model(cfg["model"])
    placement = Placement(torch.device("cpu"))
    loader, _ = train.make_loaders(cfg, model, placement, "cfg.yaml")
    trainer = loop.Trainer(cfg, model, loader, placement, run=runs.Run.of(cfg, folder=tmp_path))
    preflight.check_whole_step(trainer, first_samples(loader.dataset, 2), None, "cfg.yaml")
    assert model.pooled_a == 0 and model.pool_a.abs().sum() == 0
    assert trainer.run_epoch(1, tqdm(disable=True))
    assert model.pooled_a == 50 and model.pooled_b == 50  # 64 fakes shown: the first 50 fill it


def test_the_sample_rows_are_a_row_per_class_from_the_same_noise():
    cfg = config.load_training_config(SRC / cfg_path("cond_gan"))
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
