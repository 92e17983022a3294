"""Sweeps (train.py --sweep), their ranked table, and training.max_steps."""
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CHECKPOINTS, TIMEOUT, TRAIN_CFG, checkpoints, run, script_env
from engine.errors import UserError
from engine.sweep import combinations, csv_text, markdown, parse_axes, ranked_table, split_values

TINY_RUN = ["training.n_epochs=1", "logging.tensorboard=false", "training.num_threads=1", "logging.image_every=100"]
GRID = ["--sweep", "training.learning_rate=1e-3,4e-4", "--sweep", "training.seed=0,1"]


def sweep_args(folder, *sweep, sets=TINY_RUN):
    args = ["train.py", "-t", TRAIN_CFG, "--set", f"saving.save_folder_name={folder}"]
    for item in sets:
        args += ["--set", item]
    return args + list(sweep)


def state_of(folder):
    return json.loads((folder / "sweep.json").read_text())


def final_weights(run_folder):
    return torch.load(checkpoints(run_folder)[-1], weights_only=True)["model_state_dict"]


# ---- the command line's axes, in-process ----
def test_values_split_at_top_level_commas_only():
    assert split_values("1e-4, 2e-4") == ["1e-4", "2e-4"]
    assert split_values("[1, 2],{a: 1, b: 2},'x,y'") == ["[1, 2]", "{a: 1, b: 2}", "'x,y'"]


def test_a_grid_is_every_combination_in_order():
    axes = parse_axes(["training.learning_rate=1e-3,2e-3", "loss.loss_fn=a,b,c"], None)
    runs = combinations(axes, None, 0)
    assert len(runs) == 6
    assert runs[0] == ["training.learning_rate=1e-3", "loss.loss_fn=a"]
    assert runs[-1] == ["training.learning_rate=2e-3", "loss.loss_fn=c"]


def test_random_search_draws_the_same_values_from_the_same_seed():
    items = ["training.learning_rate=loguniform(1e-5,1e-2)", "training.batch_size=randint(8,64)",
             "loss.loss_fn=choice(a,b)", "training.seed=0,1"]
    first = combinations(parse_axes(items, 5), 5, seed=3)
    assert first == combinations(parse_axes(items, 5), 5, seed=3)
    assert first != combinations(parse_axes(items, 5), 5, seed=4)
    assert len(first) == 10  # 5 draws x 2 seeds, each draw shared by both seeds
    assert [r[:3] for r in first[0::2]] == [r[:3] for r in first[1::2]]
    for combo in first:
        values = dict(item.split("=", 1) for item in combo)
        assert 1e-5 <= float(values["training.learning_rate"]) <= 1e-2
        assert 8 <= int(values["training.batch_size"]) <= 64
        assert values["loss.loss_fn"] in ("a", "b")


@pytest.mark.parametrize("items, trials, says", [
    (["training.learning_rate"], None, "expected KEY=V1,V2"),
    (["training.learning_rate=1e-3,,2e-3"], None, "an empty value"),
    (["training.seed=0,1", "training.seed=2"], None, "given twice"),
    (["training.learning_rate=loguniform(1e-5,1e-2)"], None, "needs --sweep-trials"),
    (["training.learning_rate=loguniform(0,1e-2)"], 3, "both above 0"),
    (["training.learning_rate=uniform(2,1)"], 3, "LOW <= HIGH"),
    (["training.batch_size=randint(8,x)"], 3, "two integers"),
])
def test_bad_sweep_items_are_user_errors(items, trials, says):
    with pytest.raises(UserError, match=says.replace("+", r"\+")):
        parse_axes(items, trials)


# ---- the ranked table, in-process ----
def rows(fid, psnr, steps=3):
    """A run's metrics.jsonl rows: a training term at every step, FID and PSNR at the last."""
    out = [{"step": s, "epoch": 1, "generator/total": 1.0 / s} for s in range(1, steps + 1)]
    out[-1] |= {"sample/fid": fid, "validation/generator/psnr": psnr}
    return out


def test_the_table_ranks_configurations_by_their_mean_over_seeds():
    runs = [({"training.learning_rate": "1e-3", "training.seed": "0"}, rows(10.0, 20.0)),
            ({"training.learning_rate": "1e-3", "training.seed": "1"}, rows(14.0, 22.0)),
            ({"training.learning_rate": "5e-4", "training.seed": "0"}, rows(8.0, 18.0)),
            ({"training.learning_rate": "5e-4", "training.seed": "1"}, rows(9.0, 19.0))]
    table = ranked_table(runs, "sample/fid")
    assert table["keys"] == ["training.learning_rate"]  # the seed is no configuration key
    assert [r["config"]["training.learning_rate"] for r in table["rows"]] == ["5e-4", "1e-3"]
    mean, sd = table["rows"][1]["stats"]["sample/fid"]["final"]
    assert mean == 12.0 and math.isclose(sd, np.std([10.0, 14.0], ddof=1))
    assert [r["runs"] for r in table["rows"]] == [2, 2]
    by_psnr = ranked_table(runs, "validation/generator/psnr")  # higher is better
    assert by_psnr["rows"][0]["config"]["training.learning_rate"] == "1e-3"
    text = markdown(table)
    assert text.splitlines()[2].startswith("| 1 (best) | 5e-4 | 2 | 8.5 ± 0.71 |")
    assert "ranked by the mean over seeds of the final sample/fid" in text
    header, first = csv_text(table).splitlines()[:2]
    assert header.startswith("rank,training.learning_rate,runs,final sample/fid mean,final sample/fid sd")
    assert first.startswith("1,5e-4,2,8.5,0.707107")


def test_without_a_named_key_the_table_ranks_by_the_validation_loss():
    a = [{"step": 1, "generator/total": 0.5, "validation/generator/total": 0.3}]
    b = [{"step": 1, "generator/total": 0.1, "validation/generator/total": 0.6}]
    table = ranked_table([({"loss.loss_fn": "a"}, a), ({"loss.loss_fn": "b"}, b)])
    assert table["rank_by"] == "validation/generator/total"
    assert [r["config"]["loss.loss_fn"] for r in table["rows"]] == ["a", "b"]


# ---- train.py --sweep ----
def test_a_bad_value_fails_the_sweep_before_any_run_trains(repo):
    proc = run(repo, *sweep_args("sweep_bad", "--sweep", "training.optimizer=Adam,Adamm"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "run 2 of 2" in proc.stderr and "Adamm" in proc.stderr and "Traceback" not in proc.stderr
    assert not (repo / CHECKPOINTS / "sweep_bad").exists()  # no run, no sweep folder


def start_and_stop(repo, args, log, ready):
    """Start `train.py *args` (a sweep), send it SIGTERM once `ready()`; its exit status."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=repo, stdout=out, stderr=subprocess.STDOUT,
                                env=script_env())
        try:
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None and not ready():
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.fixture(scope="module")
def grid(repo, tmp_path_factory):
    """A 2 x 2 grid (learning rate x seed) of one-epoch toy GAN runs (128 steps), two at a time,
    stopped by SIGTERM once the first two are done and a third has its first checkpoint, then the
    same command again: (sweep.json when stopped, the second command's output, its folder)."""
    args = sweep_args("sweep_grid", *GRID, "--jobs", "2", sets=[*TINY_RUN, "training.batch_size=4"])
    saves = repo / CHECKPOINTS / "sweep_grid"

    def ready():
        state = (saves / "sweep_1" / "sweep.json").is_file() and state_of(saves / "sweep_1")
        return state and sum(r["state"] == "done" for r in state["runs"]) >= 2 and \
            any(r["state"] == "running" and checkpoints(r["folder"]) for r in state["runs"])

    log = tmp_path_factory.mktemp("sweep") / "first.log"
    status = start_and_stop(repo, args, log, ready)
    assert status == 128 + signal.SIGTERM, log.read_text()
    stopped = state_of(saves / "sweep_1")
    for r in stopped["runs"]:
        r["checkpoints"] = {p: p.stat().st_mtime_ns for p in checkpoints(r["folder"])} if r["folder"] else {}
    again = run(repo, *args)
    return stopped, again, saves


@pytest.mark.slow
def test_a_grid_trains_every_run_and_ranks_them(grid, repo):
    _, proc, saves = grid
    state = state_of(saves / "sweep_1")
    assert [run["state"] for run in state["runs"]] == ["done"] * 4
    assert [run["overrides"] for run in state["runs"]] == [
        [f"training.learning_rate={lr}", f"training.seed={seed}"] for lr in ("1e-3", "4e-4") for seed in (0, 1)]
    folders = sorted(run["folder"] for run in state["runs"])
    assert folders == sorted(str(saves / f"run_{i}") for i in range(1, 5))
    assert sorted(p.name for p in saves.iterdir()) == ["run_1", "run_2", "run_3", "run_4", "sweep_1"]
    for run_ in state["runs"]:
        snapshot = next((saves / run_["folder"]).glob("training_cfg_*.yaml")).read_text()
        assert f"learning_rate: {float(run_['overrides'][0].split('=')[1])}" in snapshot  # as if typed with --set
        assert run_["metrics"]["generator/total"] > 0
    # the table: one row per learning rate, ranked by the generator's mean final loss over its seeds
    table = (saves / "sweep_1" / "table.md").read_text()
    means = {lr: np.mean([r["metrics"]["generator/total"] for r in state["runs"] if r["overrides"][0].endswith(lr)])
             for lr in ("1e-3", "4e-4")}
    assert "ranked by the mean over seeds of the final generator/total" in table
    best = min(means, key=means.get)
    assert table.splitlines()[2].startswith(f"| 1 (best) | {best} | 2 |")
    assert table in proc.stdout
    # evaluate_training.py draws it and writes the same ranking
    plots = run(repo, "evaluate_training.py", "--sweep", saves / "sweep_1")
    assert "1 (best)" in plots.stdout
    results = repo / "results" / "example_model" / "sweep_grid" / "sweep_1"
    assert {p.name for p in results.iterdir()} >= {"sweep_1.png", "sweep_1.md", "sweep_1.csv"}
    wrong = run(repo, "evaluate_training.py", "--sweep", saves / "sweep_1", "--rank-by", "sample/nope", check=False)
    assert wrong.returncode == 2 and "sample/nope" in wrong.stderr


@pytest.mark.slow
def test_a_stopped_sweep_resumes_without_retraining_finished_runs(grid):
    stopped, _, _ = grid
    states = [r["state"] for r in stopped["runs"]]
    assert states[:2] == ["done", "done"] and "pending" in states[2:], states  # the stopped runs: pending again
    resumed = 0
    for run_ in stopped["runs"]:
        starts = json.loads((Path(run_["folder"]) / "run.json").read_text())["starts"]
        if run_["state"] == "done":  # skipped: its files untouched
            assert {p: p.stat().st_mtime_ns for p in run_["checkpoints"]} == run_["checkpoints"]
            assert len(starts) == 1
        elif run_["checkpoints"]:  # went on from the checkpoint it saved when stopped
            assert len(starts) == 2 and starts[1]["resumed_at_step"] > 0
            resumed += 1
        else:  # stopped before it wrote anything: started afresh
            assert len(starts) == 1
    assert resumed >= 1


@pytest.mark.slow
def test_the_same_sweep_again_trains_nothing(grid, repo):
    *_, saves = grid
    before = {p: p.stat().st_mtime_ns for p in saves.rglob("*.pth")}
    args = sweep_args("sweep_grid", *GRID, "--jobs", "2", sets=[*TINY_RUN, "training.batch_size=4"])
    again = run(repo, *args)
    assert "all 4 runs are done; nothing to do" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in saves.rglob("*.pth")} == before


@pytest.mark.slow
def test_runs_two_at_a_time_and_resumed_give_the_weights_of_runs_alone(grid, repo):
    """A sweep's run is train.py with its --set items: two at a time, stopped and resumed or not,
    each ends with the weights it gets alone."""
    stopped, *_ = grid
    for run_ in stopped["runs"][1:3]:  # one finished before the stop, one stopped
        alone = f"sweep_alone_{run_['overrides'][1].split('=')[1]}_{run_['overrides'][0].split('=')[1]}"
        run(repo, *sweep_args(alone, sets=[*TINY_RUN, "training.batch_size=4", *run_["overrides"]]))
        a, b = final_weights(repo / CHECKPOINTS / alone / "run_1"), final_weights(run_["folder"])
        assert all(torch.equal(a[k], b[k]) for k in a), run_["overrides"]


# ---- training.max_steps ----
@pytest.mark.slow
def test_max_steps_stops_saves_and_resumes_bit_for_bit(repo):
    common = ["logging.tensorboard=false", "training.n_epochs=5", "training.num_threads=1"]  # 16 steps per epoch
    straight = run(repo, *sweep_args("steps_straight", sets=[*common, "training.max_steps=40"]))
    assert "trained to step 40 (training.max_steps), epoch 2 and 8 steps" in straight.stdout
    run(repo, *sweep_args("steps_split", sets=[*common, "training.max_steps=20"]))
    split = repo / CHECKPOINTS / "steps_split" / "run_1"
    cut = torch.load(checkpoints(split)[-1], weights_only=True)
    assert (cut["step"], cut["epoch"], cut["batches_done_in_epoch"]) == (20, 1, 4)
    again = run(repo, *sweep_args("steps_split", sets=[*common, "training.max_steps=40",
                                                         "model.model_checkpoint_filename=latest"]))
    assert "training.max_steps: 20 -> 40" in again.stdout
    a, b = final_weights(split), final_weights(repo / CHECKPOINTS / "steps_straight" / "run_1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    done = run(repo, *sweep_args("steps_split", sets=[*common, "training.max_steps=40",
                                                        "model.model_checkpoint_filename=latest"]))
    assert "already at step 40 (training.max_steps: 40); nothing to do" in done.stdout
