"""The README as a newcomer uses it: the "Add your own model" recipe run literally, every relative
link of the README and docs/ leading somewhere, and the README's length.

How the recipe is read from README.md (the README keeps to this format):
- The section runs from the heading `## Add your own model` to the next `## ` heading.
- A file is a fenced code block whose opening fence comes on the line right after a line
  `Save as `<path>`:` (the path in backticks, relative to the repository root). Its text is
  written to that path, which must be new and lie under models/<name>/ or configs/<name>/.
- A command block is a ```bash or ```sh fence. Each of its lines is one command, run in order
  (blank lines and `#` comments are skipped, a trailing backslash continues a line). A line
  starting with `python` runs with this interpreter in a fresh copy of the repository, with the
  environment of conftest's script_env(); a `torchrun` line is skipped (DDP is tested in
  test_cli.py); anything else fails the test, so that every command the recipe shows is run here.
- Other fenced blocks (```text output, say) are not run.
"""
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import IGNORE, SRC, run

README = SRC / "README.md"
SECTION = "## Add your own model"
SAVE_AS = re.compile(r"^Save as `(?P<path>[^`]+)`:\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
COMMAND_LANGS = ("bash", "sh")
SCRIPTS = ("train.py", "evaluate.py", "evaluate_training.py", "jit_trace_model.py")
MAX_WORDS = 2500


def section(text, heading):
    """The lines of the `## ` section titled `heading`, up to the next `## ` heading."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == heading]
    assert starts, f"README.md has no section {heading!r}"
    body = []
    for line in lines[starts[0] + 1:]:
        if line.startswith("## "):
            break
        body.append(line)
    return body


def fenced_blocks(lines):
    """(language, the line before the opening fence, the block's text) of each fenced block."""
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"unclosed code block after: {lines[i - 1] if i else ''!r}"
        blocks.append((opening["lang"], lines[i - 1] if i else "", "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


def recipe():
    """({path: text} of the recipe's files, [command line, ...] in order)."""
    files, commands = {}, []
    for lang, before, text in fenced_blocks(section(README.read_text(), SECTION)):
        saved = SAVE_AS.match(before)
        if saved:
            files[saved["path"]] = text
        elif lang in COMMAND_LANGS:
            commands += command_lines(text)
    return files, commands


def command_lines(text):
    lines, pending = [], ""
    for line in text.splitlines():
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
        elif line and not line.startswith("#"):
            lines.append(line)
    return lines


def model_name(files):
    """The <name> of models/<name>/ that the recipe's files add; every file lies in that model's folders."""
    names = {Path(path).parts[1] for path in files if Path(path).parts[0] == "models" and len(Path(path).parts) == 3}
    assert len(names) == 1, f"the recipe should add one model folder models/<name>/, found: {sorted(names)}"
    name = names.pop()
    for path in files:
        assert Path(path).parts[:2] in (("models", name), ("configs", name)), \
            f"{path}: the recipe's files go under models/{name}/ or configs/{name}/"
    return name


def test_recipe_is_complete():
    files, commands = recipe()
    assert files, f"{SECTION}: no file blocks (a line 'Save as `<path>`:' right before a code block)"
    name = model_name(files)
    for path in files:
        assert not (SRC / path).exists(), f"{path}: the recipe must add new files, not replace shipped ones"
    assert f"models/{name}/{name}_architecture.yaml" in files and f"models/{name}/{name}.py" in files
    for script in SCRIPTS:
        assert any(script in shlex.split(line)[:2] for line in commands), f"{SECTION}: no {script} command"


@pytest.mark.slow
def test_recipe_runs_as_written(tmp_path):
    files, commands = recipe()
    assert files and commands, f"{SECTION}: no file blocks or no commands"
    name = model_name(files)
    repo = tmp_path / "repo"
    shutil.copytree(SRC, repo, ignore=IGNORE)  # a copy of its own: nothing shared with other tests
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    ran = []
    for line in commands:
        argv = shlex.split(line)
        if argv[0] == "torchrun":
            continue  # needs several processes; DDP runs are tested in test_cli.py
        assert argv[0] == "python", f"{line!r}: the recipe's commands are python ones (see this file's docstring)"
        run(repo, *argv[1:])
        ran.append(argv[1])

    training_cfgs = [yaml.safe_load(text) for path, text in files.items()
                     if path.startswith("configs/") and "training" in (yaml.safe_load(text) or {})]
    assert training_cfgs, "the recipe has no training config"
    n_epochs = training_cfgs[0]["training"]["n_epochs"]
    runs = repo / "models" / name / "model_checkpoints"
    final = list(runs.rglob(f"*_epoch{n_epochs}_*.pth"))
    assert final, f"no checkpoint of epoch {n_epochs} under {runs}: {sorted(p.name for p in runs.rglob('*'))}"
    results = repo / "results" / name
    if "evaluate.py" in ran:
        metrics = list(results.rglob("*_metrics.json"))
        assert metrics and list(results.rglob("*_samples.png")), f"no evaluation outputs under {results}"
        assert json.loads(metrics[0].read_text())["n_samples"] > 0
    if "evaluate_training.py" in ran:
        assert list(results.rglob("training_losses.png")), f"no training_losses.png under {results}"
    if "jit_trace_model.py" in ran:
        traced = [p for p in runs.rglob("jit/*") if p.suffix in (".pt", ".pt2", ".onnx")]
        assert traced and list(runs.rglob("jit/*.raw")), f"no traced model under {runs}/.../jit/"


# ---- links and length ---------------------------------------------------------------------------
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files():
    return [README, *sorted((SRC / "docs").glob("*.md"))]


def prose(text):
    """The text outside fenced code blocks and inline code (where a [x](y) is not a link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path):
    """GitHub's anchors for the headings of a markdown file: lower case, punctuation dropped,
    spaces as hyphens, a -1, -2, ... suffix on repeats."""
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_relative_links_lead_somewhere(doc):
    broken = []
    for target in (m["target"] for m in LINK.finditer(prose(doc.read_text()))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(SRC)}")
    assert not broken, f"{doc.relative_to(SRC)}: " + "; ".join(broken)


def test_quick_start_is_two_blocks_that_install_what_they_run():
    """README's quick start is the two blocks .ci/quickstart runs in a fresh environment: the first
    installs the pipeline and trains the toy GAN, the second installs what the tests import
    (pytest among it) and runs the fast subset."""
    blocks = [text for _, _, text in fenced_blocks(section(README.read_text(), "## Quick start"))]
    assert len(blocks) == 2, blocks
    install, train = [line for line in blocks[0].splitlines() if line.strip()]
    assert install.startswith("pip install torch torchvision") and "-r requirements.txt" in install
    assert train == "python train.py -t configs/example_model/example_training_cfg.yaml"
    install_dev, test = [line.split("#")[0].strip() for line in blocks[1].splitlines() if line.strip()]
    assert install_dev == "pip install -r requirements-dev.txt"
    assert test == 'python -m pytest -q -m "not slow" tests'
    dev = (SRC / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev and any(re.match(r"pytest\b", line) for line in dev)
    assert "bash .ci/quickstart" in (SRC / ".ci" / "run").read_text().splitlines()


def test_readme_is_short():
    words = len(README.read_text().split())  # what `wc -w README.md` counts, code blocks included
    assert words <= MAX_WORDS, f"README.md has {words} words; keep it to {MAX_WORDS} and move detail to docs/"
