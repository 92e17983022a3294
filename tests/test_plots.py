"""The figures as a reader reads them: sample grids on a stated scale that noisy inputs do not
wash out, grids shaped like their images, loss plots that show every step and its average, name
each network by its role and draw the learning rate only where it moves, and no two texts of any
figure on top of each other. Everything is built from small synthetic tensors and runs dicts
(as evaluate_training.read_run returns them), so the file runs in seconds."""
import itertools
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

import evaluate  # noqa: E402
import evaluate_training  # noqa: E402

CLASSIFIER_ARCH = "models/shape_classifier/shape_classifier_architecture.yaml"
LONG_NAMES = [f"category{i:02d}" for i in range(10)]  # 10 classes of 10 characters


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ---- helpers -------------------------------------------------------------------------------------
def visible_texts(fig):
    """(where, Text) of every text a reader sees: the suptitle, and of every Axes (colour bars
    included) its titles, axis labels, tick labels, offset text, own texts and legend; then the
    figure's legends."""
    found = [("suptitle", fig._suptitle)] if fig._suptitle is not None else []
    for i, ax in enumerate(fig.axes):
        found += [(f"axes {i} title", t) for t in (ax.title, ax._left_title, ax._right_title)]
        for axis in (ax.xaxis, ax.yaxis) if ax.axison else ():
            found += [(f"axes {i} {axis.axis_name} label", axis.label),
                      (f"axes {i} {axis.axis_name} offset", axis.get_offset_text())]
            found += [(f"axes {i} {axis.axis_name} tick", t) for t in drawn_tick_labels(axis)]
        found += [(f"axes {i} text", t) for t in ax.texts]
        if ax.get_legend() is not None:
            found += legend_texts(ax.get_legend(), f"axes {i} legend")
    for j, legend in enumerate(fig.legends):
        found += legend_texts(legend, f"figure legend {j}")
    return [(where, t) for where, t in found if t.get_visible() and t.get_text().strip()]


def drawn_tick_labels(axis):
    """The tick labels matplotlib draws: those of ticks inside the axis' view (it keeps labels
    of ticks just outside, undrawn)."""
    low, high = sorted(axis.get_view_interval())
    slack = 1e-9 * (high - low)
    labels = []
    for locs, ticks in ((axis.get_majorticklocs(), axis.get_major_ticks), (axis.get_minorticklocs(),
                                                                          axis.get_minor_ticks)):
        for loc, tick in zip(locs, ticks(len(locs))):
            if low - slack <= loc <= high + slack:
                labels += [label for label in (tick.label1, tick.label2) if label.get_visible()]
    return labels


def legend_texts(legend, where):
    return [(f"{where} title", legend.get_title())] + [(f"{where} entry", t) for t in legend.get_texts()]


def overlapping_texts(fig):
    """The pairs of visible texts whose boxes overlap by more than a pixel each way."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(f"{where} {t.get_text()!r}", t.get_window_extent(renderer)) for where, t in visible_texts(fig)]
    clashes = []
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        width = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        height = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        if width > 1 and height > 1:
            clashes.append((a, b))
    return clashes


def texts_outside(fig):
    """The visible texts that reach past the figure's edges (cut off in the PNG)."""
    fig.canvas.draw()
    renderer, (width, height) = fig.canvas.get_renderer(), fig.canvas.get_width_height()
    return [t.get_text() for _, t in visible_texts(fig)
            if (box := t.get_window_extent(renderer)).x0 < -1 or box.y0 < -1 or box.x1 > width + 1
            or box.y1 > height + 1]


def image_pixels(ax):
    """The grey levels (0..1) of the images in a grid panel: its pixels with R = G = B (the pad
    between images is coloured, not grey)."""
    array = np.asarray(ax.get_images()[0].get_array(), dtype=float)
    grey = (array[..., 0] == array[..., 1]) & (array[..., 1] == array[..., 2])
    return array[..., 0][grey]


def shapes(n, size=16, seed=0):
    """n images in [-1, 1] of a bright square on a dark ground, with grey levels between."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.full((n, 1, size, size), -1.0)
    images[:, :, size // 4:3 * size // 4, size // 4:3 * size // 4] = 1.0
    images[:, :, 0, :] = torch.rand(n, 1, size, generator=generator) * 2 - 1
    return images


def fake_run(label, curves, adversarial=False, roles=None):
    """A runs dict as evaluate_training.read_run returns it."""
    return {"folder": Path(label), "checkpoint": None, "epoch": None, "config": {}, "curves": curves,
            "adversarial": adversarial, "roles": roles or {}, "results": Path("results"),
            "save_folder_name": "run", "last_step": 200, "label": label}


STEPS = np.arange(1, 201)


def classifier_run(lr=None):
    rng = np.random.default_rng(0)
    lr = 0.003 * (1 + np.cos(np.pi * STEPS / 200)) / 2 if lr is None else np.full(200, lr)
    return fake_run("run_1", {"generator/cross_entropy": (STEPS, np.exp(-STEPS / 40) + 0.05 * rng.random(200)),
                              "validation/generator/cross_entropy": (STEPS[19::20], np.exp(-STEPS[19::20] / 40)),
                              "generator/lr": (STEPS, lr)},
                    roles={"generator": "classifier"})


def gan_run(label, lr, seed=0):
    rng = np.random.default_rng(seed)
    return fake_run(label, {"discriminator/total": (STEPS, 0.3 * rng.random(200) + 0.1),
                            "discriminator/d_real": (STEPS, 0.1 * rng.random(200) + 0.05),
                            "discriminator/d_fake": (STEPS, 0.1 * rng.random(200) + 0.05),
                            "generator/g_adv": (STEPS, 0.5 + 0.1 * rng.standard_normal(200)),
                            "generator/lr": (STEPS, np.full(200, lr)),
                            "discriminator/lr": (STEPS, np.full(200, 0.001))},
                    adversarial=True, roles={"generator": "generator", "discriminator": "discriminator"})


def panel_titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


# ---- sample grids --------------------------------------------------------------------------------
def test_noisy_inputs_do_not_wash_out_the_outputs():
    """A denoiser that returns its targets exactly: the output panel spans black to white as the
    target panel does, however far the noisy inputs reach; each title states the scale, and the
    inputs' says they are clipped."""
    targets = shapes(16)
    inputs = targets + 3 * torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    fig = evaluate.sample_grid(inputs, targets.clone(), targets, 8, "unet.pth")
    ax_in, ax_out, ax_target = fig.axes
    out, target = image_pixels(ax_out), image_pixels(ax_target)
    assert out.min() == target.min() == 0 and out.max() == target.max() == 1  # -1 is black, 1 white
    assert np.array_equal(np.sort(out), np.sort(target))
    assert "shown on [-1, 1], none clipped" in ax_out.get_title()
    assert "shown on [-1, 1]" in ax_in.get_title() and "% of values clipped" in ax_in.get_title()
    assert set(np.unique(image_pixels(ax_in))) >= {0.0, 1.0}  # clipped to the range, not rescaled


def test_a_generator_is_shown_on_the_datas_range():
    """A GAN whose samples are still faint (all within [-0.1, 0.1]) shows them as faint, on the
    real samples' [-1, 1], not stretched to look like data."""
    generated = torch.rand(16, 1, 4, 4) * 0.2 - 0.1
    fig = evaluate.sample_grid(None, generated, shapes(64, size=4), 8, "gan.pth")
    ax_generated, ax_data = fig.axes
    assert ax_generated.get_title().startswith("generated\nshown on [-1, 1]")
    pixels = image_pixels(ax_generated)
    assert 0.44 < pixels.min() and pixels.max() < 0.56  # grey, as -0.1..0.1 is on [-1, 1]
    assert image_pixels(ax_data).max() == 1


def test_without_a_usual_range_each_panel_is_stretched_and_says_so():
    targets = shapes(9) * 150 + 151.5  # 1.5 .. 301.5: no usual image range holds it
    fig = evaluate.sample_grid(targets + 40, targets, targets, 8, "other.pth")
    for ax in fig.axes:
        assert "stretched: black" in ax.get_title()
        assert image_pixels(ax).min() == 0 and image_pixels(ax).max() == 1


@pytest.mark.parametrize("n, most, columns", [(16, 8, 4), (9, 8, 3), (10, 8, 4), (512, 8, 8), (3, 8, 2), (1, 8, 1)])
def test_a_grid_is_about_square(n, most, columns):
    """About sqrt(n) images a row, at most `most`: 16 samples make 4 x 4, not 8 x 2."""
    fig = evaluate.sample_grid(None, shapes(min(n, most * most), size=8), None, most, "g.pth")
    width = fig.axes[0].get_images()[0].get_array().shape[1]
    assert width == columns * (8 + 2) + 2  # 2 pixels of pad around each image


@pytest.mark.parametrize("height, width", [(16, 64), (64, 16), (32, 32)])
def test_the_figure_is_shaped_like_its_grid(height, width):
    """The grid fills the figure (no wide blank margins), so the figure's aspect follows the
    grid's: wide images make a wide figure and tall ones a tall one."""
    images = torch.zeros(16, 1, height, width)
    fig = evaluate.sample_grid(images, images, images, 8, "g.pth")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.get_images()[0].get_window_extent(renderer) for ax in fig.axes]
    fig_width, fig_height = fig.canvas.get_width_height()
    assert sum(box.width for box in boxes) > 0.85 * fig_width
    assert fig_height - boxes[0].height < 120  # the titles' four lines take the rest (the figure's two, a panel's two)
    grid = fig.axes[0].get_images()[0].get_array().shape
    assert boxes[0].width / boxes[0].height == pytest.approx(grid[1] / grid[0], rel=0.02)


# ---- no text on top of another -------------------------------------------------------------------
FIGURES = {
    "denoiser grid": lambda: evaluate.sample_grid(shapes(64, 32) * 2, shapes(64, 32), shapes(64, 32), 8,
                                                  "unet_gan_epoch10_20250101-120000.pth"),
    "GAN grid of 4x4 images": lambda: evaluate.sample_grid(None, shapes(64, 4), shapes(64, 4), 8,
                                                           "example_gan_epoch100_20250101-120000.pth"),
    "one image": lambda: evaluate.sample_grid(None, shapes(1, 4), None, 8, "example_gan_epoch100_20250101.pth"),
    "labelled inputs, 10 long class names": lambda: evaluate.labelled_inputs(
        shapes(25) * 1.3, torch.arange(25) % 10, torch.arange(25).flip(0) % 10, LONG_NAMES, 5,
        "shape_classifier_epoch12_20250101-120000.pth"),
    "confusion matrix, 10 long class names": lambda: evaluate.confusion_matrix(
        (torch.arange(100).view(10, 10) * 37 % 500).tolist(), LONG_NAMES,
        "shape_classifier_epoch12_20250101-120000.pth\nvalidation accuracy 0.990 (300 samples)"),
    "classifier losses": lambda: evaluate_training.plot([classifier_run()], 10),
    "two GAN runs": lambda: evaluate_training.plot([gan_run("run_1", 0.001), gan_run("run_2", 0.0002, 1)], 10),
}


@pytest.mark.parametrize("name", FIGURES)
def test_no_two_texts_overlap(name):
    fig = FIGURES[name]()
    assert overlapping_texts(fig) == []
    assert texts_outside(fig) == []


def test_the_overlap_check_finds_overlaps():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_title("a title much wider than this little figure is")
    fig.suptitle("and a suptitle on top of it", y=0.9)
    assert overlapping_texts(fig)
    assert texts_outside(fig)


def test_labelled_inputs_put_mistakes_first_with_their_true_class():
    predicted, targets = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 9, 3])
    fig = evaluate.labelled_inputs(shapes(4), predicted, targets, LONG_NAMES, 8, "c.pth")
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titles == ["category02\ntrue: category09", "category00", "category01", "category03"]
    assert "inputs shown on [-1, 1], none clipped" in fig._suptitle.get_text()


# ---- loss plots ----------------------------------------------------------------------------------
def test_the_learning_rate_panel_only_where_a_rate_changes():
    changing = evaluate_training.plot([classifier_run()], 10)
    assert "learning rate" in panel_titles(changing)
    constant = evaluate_training.plot([gan_run("run_1", 0.001), gan_run("run_2", 0.0002, 1)], 10)
    assert "learning rate" not in panel_titles(constant)
    assert [t.get_text() for t in constant.legends[0].get_texts()] == [  # the rates, then, in the legend
        "run_1\nlearning rate 0.001", "run_2\ngenerator: learning rate 0.0002\ndiscriminator: learning rate 0.001"]


def test_a_classifier_is_called_a_classifier():
    """Its metrics.jsonl keys say generator/...; the figure says classifier, and nowhere generator."""
    fig = evaluate_training.plot([classifier_run()], 10)
    assert panel_titles(fig)[0] == "classifier"
    texts = [t.get_text() for _, t in visible_texts(fig)]
    assert not [t for t in texts if "generator" in t]
    assert "classifier" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]  # the lr panel's


def test_a_gans_panels_are_its_generator_and_discriminator():
    fig = evaluate_training.plot([gan_run("run_1", 0.001)], 10)
    assert panel_titles(fig) == ["discriminator", "generator"]


def test_every_panel_has_labelled_axes():
    runs = [classifier_run()]
    runs[0]["curves"] |= {"sample/fid": (STEPS[::50], np.array([9.0, 4.0, 1.0, 0.5]))}
    fig = evaluate_training.plot(runs, 10)
    drawn = [ax for ax in fig.axes if ax.get_lines()]
    assert len(drawn) == 3
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in drawn] == [
        ("step", "loss"), ("step", "FID"), ("step", "learning rate")]


def test_training_terms_are_drawn_raw_and_smoothed_in_one_colour():
    run = classifier_run()
    fig = evaluate_training.plot([run], 10)
    lines = fig.axes[0].get_lines()
    raw = [line for line in lines if line.get_gid() == "raw"]
    assert len(raw) == 1  # the training term; validation is drawn once, as points
    steps, values = run["curves"]["generator/cross_entropy"]
    assert np.array_equal(raw[0].get_ydata(), values) and raw[0].get_alpha() == 0.25
    smooth = next(line for line in lines if line.get_gid() != "raw" and len(line.get_xdata()) == len(steps) - 9)
    assert np.allclose(smooth.get_ydata(), evaluate_training.moving_average(values, 10))
    assert smooth.get_color() == raw[0].get_color() and smooth.get_linewidth() > raw[0].get_linewidth()
    assert [t.get_text() for t in fig.legends[1].get_texts()] == ["every step", "mean of the last\n10 steps"]


def test_a_wide_term_gets_a_log_axis_with_raw_curves_drawn():
    """Three decades of smoothed loss turn the axis logarithmic, even with raw steps of exactly 0
    (left out on it); one decade stays linear, however far single raw steps spike."""
    wide = np.geomspace(1.0, 1e-3, 200)
    wide[::7] = 0.0
    fig = evaluate_training.plot([fake_run("run_1", {"generator/l1": (STEPS, wide)})], 5)
    assert fig.axes[0].get_yscale() == "log"
    assert fig.axes[0].get_ylim()[0] > 0
    narrow = np.linspace(1.0, 0.1, 200)
    narrow[50] = 20.0  # one spike, 4 in the smoothed curve
    fig = evaluate_training.plot([fake_run("run_1", {"generator/l1": (STEPS, narrow)})], 5)
    assert fig.axes[0].get_yscale() == "linear"
    assert fig.axes[0].get_ylim()[1] < 10  # the raw spike does not squash the curves


def test_roles_come_from_the_architecture(tmp_path):
    """A run without a discriminator is named by its generator component: from the checkpoint's
    architecture, else the file its config names, else 'model'."""
    plain = {"adversarial": {"enable_adversarial_training": False}, "model": {"architecture_cfg_path": CLASSIFIER_ARCH}}
    assert evaluate_training.roles(plain, None) == {"generator": "classifier"}
    stored = yaml.safe_dump({"model_components": {"denoiser": {"submodels": ["net"]}}})
    assert evaluate_training.roles(plain, {"architecture": stored}) == {"generator": "denoiser"}
    missing = {**plain, "model": {"architecture_cfg_path": str(tmp_path / "gone.yaml")}}
    assert evaluate_training.roles(missing, None) == {"generator": "model"}
    two = yaml.safe_dump({"model_components": {"a": {"adv_type": "generator"}, "b": {"adv_type": "generator"}}})
    assert evaluate_training.roles(plain, {"architecture": two}) == {"generator": "model"}
    gan = {"adversarial": {"enable_adversarial_training": True}}
    assert evaluate_training.roles(gan, None) == {"generator": "generator", "discriminator": "discriminator"}


def test_read_run_names_a_classifier_from_its_config_snapshot(tmp_path):
    """As evaluate_training.py reads a run folder: metrics.jsonl and the config snapshot beside it."""
    snapshot = {"adversarial": {"enable_adversarial_training": False},
                "model": {"architecture_cfg_path": CLASSIFIER_ARCH,
                          "model_flow_path": "models/shape_classifier/shape_classifier.py"},
                "saving": {"save_folder_name": "shapes_run"}}
    (tmp_path / "training_cfg_20250101-120000.yaml").write_text(yaml.safe_dump(snapshot))
    rows = [{"epoch": 1, "step": s, "generator/cross_entropy": 1.0 / s, "generator/lr": 0.003} for s in range(1, 30)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = evaluate_training.read_run({**snapshot, "config_path": "cfg.yaml"}, tmp_path, "te.yaml")
    assert run["roles"] == {"generator": "classifier"}
    evaluate_training.label_runs([run])
    fig = evaluate_training.plot([run], 10)
    assert panel_titles(fig) == ["classifier"]  # and no learning-rate panel: it stayed at 0.003
    assert fig.legends[0].get_texts()[0].get_text() == f"{tmp_path.name}\nlearning rate 0.003"


def test_validation_metrics_are_not_drawn_as_losses():
    """PSNR in dB and SSIM (metrics.py) get panels of their own, labelled so, not the loss axis."""
    run = gan_run("run_1", 0.001)
    epochs = STEPS[49::50]
    run["curves"] |= {"validation/generator/l1": (epochs, np.array([0.3, 0.2, 0.15, 0.1])),
                      "validation/generator/psnr": (epochs, np.array([20.0, 21.0, 22.0, 22.5])),
                      "validation/generator/ssim": (epochs, np.array([0.7, 0.8, 0.83, 0.85]))}
    fig = evaluate_training.plot([run], 10)
    labels = {ax.get_title(): ax.get_ylabel() for ax in fig.axes if ax.get_lines()}
    assert labels == {"discriminator": "loss", "generator": "loss", "validation PSNR (higher is better)": "PSNR (dB)",
                      "validation SSIM (higher is better)": "SSIM"}
    generator = next(ax for ax in fig.axes if ax.get_title() == "generator")
    assert [t.get_text() for t in generator.get_legend().get_texts()] == ["g_adv", "validation l1"]
    assert len(fig.axes) == 4  # 2 x 2, not a row of three and one alone
