"""dashboard.py: what a run shows while it trains, in TensorBoard or, without it, as PNG files."""
import importlib.util

import pytest
import torch

from engine import dashboard
from engine.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
CFG = {"training": {"learning_rate": 0.001, "gpus": [0, 1], "seed": 1}, "loss": {"loss_args": {}},
       "saving": {"save_folder_name": "run"}}


def rows(steps, offset=0.0):
    return [{"epoch": 1, "step": s, "time": 1.0e9 + s, "generator/total": s + offset, "generator/lr": 0.001,
             "data_wait": 0.1} for s in steps]


def test_tensorboard_setting(monkeypatch):
    assert dashboard.use_tensorboard(False, "cfg: logging") is False
    assert dashboard.use_tensorboard(None, "cfg: logging") is HAS_TENSORBOARD
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert dashboard.use_tensorboard(None, "cfg: logging") is False  # null: on only when installed
    with pytest.raises(UserError, match=r"cfg: logging.tensorboard: true, but .* pip install tensorboard"):
        dashboard.use_tensorboard(True, "cfg: logging")


def test_without_tensorboard_sample_grids_are_pngs(tmp_path):
    board = dashboard.Dashboard(tmp_path, False, CFG)
    assert board.images(3, 48, torch.rand(5, 1, 4, 4) * 2 - 1) == tmp_path / "samples_epoch3.png"
    assert (tmp_path / "samples_epoch3.png").read_bytes()[:8] == PNG_MAGIC
    assert board.images(4, 64, torch.rand(5, 3)) is None  # a classifier's scores are no picture
    board.scalars(rows([1, 2]))
    board.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples_epoch3.png"]  # nothing else, no temp files


def test_values_are_mapped_to_the_unit_range():
    unit = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(dashboard.to_unit_range(unit), unit)
    assert torch.allclose(dashboard.to_unit_range(torch.tensor([-1.0, 0.0, 1.0])), unit)  # tanh outputs
    assert torch.allclose(dashboard.to_unit_range(torch.tensor([0.0, 127.5, 255.0]).round()), torch.tensor(
        [0.0, 128 / 255, 1.0]))  # 8-bit values
    assert torch.allclose(dashboard.to_unit_range(torch.tensor([-10.5, 15.5, 41.5])), unit)  # anything else
    assert torch.equal(dashboard.to_unit_range(torch.full((3,), 7.5)), torch.zeros(3))
    clipped = dashboard.to_unit_range(torch.tensor([-3.0, 0.0, 3.0]), (-1.0, 1.0))  # noisy, on the data's range
    assert torch.equal(clipped, torch.tensor([0.0, 0.5, 1.0]))


def test_known_ranges_and_what_a_figure_says_of_them():
    assert dashboard.known_range(torch.tensor([0.2, 0.9])) == (0.0, 1.0)
    assert dashboard.known_range(torch.tensor([-0.1, 0.1])) == (-1.0, 1.0)  # a faint Tanh output stays faint
    assert dashboard.known_range(torch.tensor([-1.00001, 1.0])) == (-1.0, 1.0)  # rounding
    assert dashboard.known_range(torch.tensor([0.0, 3.0, 255.0])) == (0.0, 255.0)
    assert dashboard.known_range(torch.tensor([0.0, 3.5])) is None  # not 8-bit values
    assert dashboard.known_range(torch.tensor([-1.39, 1.21])) == (-1.0, 1.0)  # data in [-1, 1], a little noise
    assert dashboard.known_range(torch.tensor([-0.2, 1.1])) == (0.0, 1.0)
    assert dashboard.known_range(torch.tensor([-2.0, 1.0])) is None  # far past any: stretched
    noisy = torch.tensor([-2.0, -0.5, 0.5, 1.0])
    assert dashboard.scale_note(noisy, (-1.0, 1.0)) == "shown on [-1, 1], 25.0% of values clipped"
    assert dashboard.scale_note(noisy.clamp(-1, 1), (-1.0, 1.0)) == "shown on [-1, 1], none clipped"
    assert dashboard.scale_note(noisy, None) == "stretched: black -2, white 1"
    assert [dashboard.grid_columns(n) for n in (1, 2, 16, 17, 1000)] == [1, 2, 4, 5, dashboard.MAX_COLUMNS]


def test_a_grid_keeps_its_images_apart_in_a_colour_no_image_has():
    grid = dashboard.image_grid(torch.ones(5, 1, 4, 4), 3)  # white images
    assert grid.shape == (3, 2 * 6 + 2, 3 * 6 + 2)
    assert grid[:, 0, 0].tolist() == pytest.approx(list(dashboard.PAD))
    assert grid[:, 2:6, 2:6].eq(1).all()  # the first image, grey (R = G = B)
    assert dashboard.image_grid(torch.ones(1, 1, 4, 4), 1).shape == (3, 8, 8)  # one image padded alike


def test_the_png_says_how_the_samples_are_scaled(tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(dashboard, "save_png", lambda path, grid, title: titles.append(title) or path)
    board = dashboard.Dashboard(tmp_path, False, CFG)
    board.images(3, 48, torch.rand(4, 1, 4, 4) * 0.2 - 0.1)
    board.images(4, 64, torch.linspace(0.5, 3, 64).view(4, 1, 4, 4))  # no usual range holds these
    assert titles == ["outputs on fixed inputs, epoch 3 (step 48)\nshown on [-1, 1], none clipped",
                      "outputs on fixed inputs, epoch 4 (step 64)\nstretched: black 0.5, white 3"]


def test_flat_config_names_keys_by_their_path():
    flat = dashboard.flat_config(CFG)
    assert flat["training.learning_rate"] == 0.001 and flat["saving.save_folder_name"] == "run"
    assert flat["training.gpus"] == "[0, 1]" and flat["loss.loss_args"] == "{}"  # hparams take scalars only


def test_scalars_leave_out_bookkeeping_and_nulls(tmp_path):
    board = dashboard.Dashboard(tmp_path, False, CFG)
    board.scalars([{"epoch": 1, "step": 3, "time": 5.0, "generator/total": None, "nonfinite": ["generator/total"],
                    "flag": True, "generator/lr": 0.01}])
    assert board.last == {"generator/lr": 0.01}


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs tensorboard (requirements-dev.txt)")
def test_a_write_of_rows_is_one_point_their_mean_on_the_last_step(tmp_path):
    """TensorBoard gets one event per write of metrics.jsonl rows (per log_interval steps), each
    key's mean over the rows that hold it; the hparams' last values are the last row's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = dashboard.Dashboard(tmp_path, True, CFG)
    written = rows([1, 2, 3])
    written[1]["discriminator/total"] = 4.0  # (a network updated on one of the steps only)
    board.scalars(written)
    board.scalars(rows([4]))
    assert board.last == {"generator/total": 4.0, "generator/lr": 0.001, "data_wait": 0.1,
                          "discriminator/total": 4.0}
    board.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("generator/total")] == [(3, 2.0), (4, 4.0)]
    assert [(e.step, e.value) for e in acc.Scalars("discriminator/total")] == [(3, 4.0)]


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs tensorboard (requirements-dev.txt)")
def test_a_resumed_run_replaces_the_steps_it_trains_again(tmp_path):
    """A run resumed from step 10 trains steps 11.. again: TensorBoard shows each step once, with
    the resumed run's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = dashboard.Dashboard(tmp_path, True, CFG)
    for step in range(1, 21):  # (log_interval 1: a write per step)
        first.scalars(rows([step]))
    first.close()
    resumed = dashboard.Dashboard(tmp_path, True, CFG, resumed_at=10)
    for step in range(11, 16):
        resumed.scalars(rows([step], offset=0.5))
    resumed.images(1, 15, torch.rand(4, 1, 4, 4))
    resumed.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("generator/total")
    assert [e.step for e in events] == list(range(1, 16))
    assert [e.value for e in events] == [float(s) for s in range(1, 11)] + [s + 0.5 for s in range(11, 16)]
    assert [e.step for e in acc.Images("samples")] == [15]
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
