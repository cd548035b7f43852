"""Every command shown in README.md, recipes/README.md and the documentation site's guide pages works as written.

The documents are README.md, recipes/README.md and every page of the site (mkdocs.yml's nav, read from its
repository file). The commands are read from their fenced ```bash blocks (continuation lines joined, comments
dropped), so a command or a page added later is picked up without touching this test. Each command is either

- run, in document order, in a scratch folder that links to the checkout's files (so `runs/` and `.cache/` land in
  the scratch folder and a later command, e.g. plot_run, finds what an earlier one wrote), with cut-down steps from
  CUT_DOWN appended (the command line wins over the recipe); `accelerate launch` gets a free port
  (`--main_process_port 0`) so that parallel tests do not collide; or
- listed in SKIPPED with the reason it cannot run here (GPU, hub model, a command that runs this suite, builds an
  environment, or takes minutes, such as the full demo and the measurement scripts: each names where it is tested).

A command that is neither, or that fails, fails the test, naming the command. An indented (unfenced) command in
any document also fails, so that no command escapes the parser. The Python blocks are complete programs that run as
written (the README's first is scripts/quickstart.py's snippet, checked against it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def site_hooks():
    """docs/hooks.py, the site's page generator (a file of the site, not a package)."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def site_documents() -> list[str]:
    """The repository files of the site's pages, in nav order: docs/<page>, or the file docs/hooks.py serves it from."""
    served_from = {page: repository_file for repository_file, page in site_hooks().PAGES_FROM_REPOSITORY.items()}

    def pages(nav):
        for entry in nav:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from pages(value) if isinstance(value, list) else [value]

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [served_from.get(page, f"docs/{page}") for page in pages(nav)]


DOCUMENTS = tuple(dict.fromkeys(["README.md", "recipes/README.md", *site_documents()]))
FENCE_OPEN = re.compile(r"^```(bash|sh|shell|console)\s*$")
COMMAND_WORDS = ("python", "accelerate", "make", "pip", "torchrun", "deepspeed", "trl-gspo-train")

# (pattern searched in the command, why it is not run here)
SKIPPED = [
    (r"^make demo$", "the full 1000-step demo (minutes); its quick form runs in tests/e2e/test_demo.py"),
    (r"^make test$", "runs this suite"),
    (r"^make install$", "builds .venv, the environment this suite runs in"),
    (r"^source \.venv/bin/activate$", "activates .venv, which this suite already runs in"),
    (r"^make test-vllm$", "runs the vLLM tests in .venv-vllm (.ci/run runs it after make test)"),
    (r"^make vllm-env$", "builds .venv-vllm (3.8 GB); make test-vllm builds it in CI"),
    (
        r"gspo_benchmarks\.vllm_mismatch",
        "a vLLM measurement in .venv-vllm (minutes); its quick form is tests/e2e/test_vllm_mismatch_benchmark.py",
    ),
    (
        r"scripts/measure_precision\.py",
        "a precision measurement (minutes); its quick form is tests/e2e/test_precision.py",
    ),
    (
        r"scripts/moe_experiment\.py",
        "the MoE experiment (minutes per seed); its quick form is tests/e2e/test_moe_experiment.py",
    ),
    (
        r"scripts/benchmark\.py",
        "a benchmark against GRPOTrainer (minutes); its quick form is tests/e2e/test_benchmark.py",
    ),
    (r"^python -m pytest ", "runs part of this suite"),
    (
        r"benchmarks/gpu_check\.sh",
        "the GPU check needs an NVIDIA GPU (--prepare: the package index); its CPU mode is tests/e2e/test_gpu_check.py",
    ),
    (
        r"^make docs-figure$",
        "runs the full demo to redraw docs/demo_training_curves.png (demo: tests/e2e/test_demo.py)",
    ),
    (r"--config recipes/qwen", "needs GPUs and a hub model (Qwen/...) and hub data; no GPU or hub here"),
    (r"^(\w+=\S+ )*trl vllm-serve ", "starts a vLLM server: needs GPUs, vLLM and a hub model"),
]
# (pattern, arguments appended to cut the command down to seconds)
CUT_DOWN = [
    (r"scripts/train_gspo\.py", ["--max_steps", "2", "--logging_steps", "1", "--report_to", "none"]),
    (r"scripts/quickstart\.py", ["--max-steps", "2"]),
]
COMMAND_TIMEOUT_S = 300


def fenced_commands(text: str) -> list[str]:
    """The shell commands of the fenced bash blocks of a Markdown text, one string each (shlex-normalised)."""
    commands, block, inside = [], [], False
    for line in text.splitlines():
        if not inside and FENCE_OPEN.match(line.strip()):
            inside, block = True, []
        elif inside and line.strip() == "```":
            inside = False
            joined = "\n".join(block).replace("\\\n", " ")
            for command_line in joined.splitlines():
                tokens = shlex.split(command_line.strip().removeprefix("$ "), comments=True)
                if tokens:
                    commands.append(shlex.join(tokens))
        elif inside:
            block.append(line)
    return commands


def unfenced_commands(text: str) -> list[str]:
    """Indented code lines outside fences that start with a command word: commands the parser would miss."""
    found, inside = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            inside = not inside
        elif not inside and line.startswith("    ") and line.split() and line.split()[0] in COMMAND_WORDS:
            found.append(line.strip())
    return found


def skip_reason(command: str) -> str | None:
    return next((reason for pattern, reason in SKIPPED if re.search(pattern, command)), None)


def runnable_argv(command: str) -> list[str]:
    """The argv that runs `command` here: this interpreter for `python`, accelerate's module for `accelerate`."""
    tokens = shlex.split(command)
    if tokens[0] == "python":
        argv = [sys.executable, *tokens[1:]]
    elif tokens[:2] == ["accelerate", "launch"]:
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", *tokens[2:]]
    elif tokens == ["make", "docs"]:  # the Makefile's recipe, in this interpreter: the site into the scratch folder
        argv = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", "site"]
    else:
        raise AssertionError(
            f"documented command {command!r} is neither run nor skipped: add it to SKIPPED in tests/e2e/test_docs.py "
            "with the reason it cannot run on a CPU, or make it runnable"
        )
    for pattern, extra in CUT_DOWN:
        if re.search(pattern, command):
            argv += extra
    return argv


def sandbox(tmp_path: Path) -> Path:
    """A folder whose entries link to the checkout's (not runs/ or .cache/): documented relative paths resolve,
    and what the commands write stays in the scratch folder."""
    folder = tmp_path / "checkout"
    folder.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {"runs", ".cache", ".git", ".venv"}:
            (folder / entry.name).symlink_to(entry)
    return folder


def test_documents_have_commands_and_no_unfenced_ones():
    assert {"README.md", "recipes/README.md", "BENCHMARKS.md", "docs/MOE.md"} <= set(DOCUMENTS), DOCUMENTS
    for document in DOCUMENTS:
        text = (ROOT / document).read_text()
        if document in ("README.md", "recipes/README.md"):
            assert fenced_commands(text), f"{document} shows no fenced bash command"
        assert unfenced_commands(text) == [], f"{document}: put these commands in a ```bash block"


def test_every_skip_entry_is_used_and_explained():
    commands = [c for d in DOCUMENTS for c in fenced_commands((ROOT / d).read_text())]
    for pattern, reason in SKIPPED:
        assert reason.strip(), pattern
        assert any(re.search(pattern, c) for c in commands), f"SKIPPED entry {pattern!r} matches no documented command"


def test_parser_reads_continuations_and_comments():
    text = "```bash\n# a comment\npython a.py \\\n    --x 1   # trailing\nmake test\n```\n    python unfenced.py\n"
    assert fenced_commands(text) == ["python a.py --x 1", "make test"]
    assert unfenced_commands(text) == ["python unfenced.py"]
    with pytest.raises(AssertionError, match="'make lint' is neither run nor skipped"):
        runnable_argv("make lint")


# (pattern searched in a Python block, why it is not run)
PYTHON_SKIPPED = [
    (r"output_router_logits=True, pad_token_id=0", "reproduces a transformers crash (docs/MOE.md, section 1)"),
]


def python_blocks(document: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / document).read_text(), flags=re.S | re.M)


def readme_python_blocks() -> list[str]:
    return python_blocks("README.md")


def test_readme_python_snippet_is_the_quickstart_script():
    """The README's first Python block is scripts/quickstart.py's snippet verbatim (and the script runs below)."""
    blocks = readme_python_blocks()
    source = (ROOT / "scripts" / "quickstart.py").read_text()
    snippet = source.split("# --- README snippet ---\n")[1].split("# --- end of README snippet ---")[0]
    assert textwrap.dedent(snippet).strip() == blocks[0].strip()


@pytest.mark.slow
def test_other_python_blocks_run(tmp_path):
    """Every other Python block of the documents (the README's later ones, the guides') is a complete program: it
    runs as written, in a scratch folder."""
    blocks = readme_python_blocks()[1:] + [block for d in DOCUMENTS if d != "README.md" for block in python_blocks(d)]
    blocks = [block for block in blocks if not any(re.search(pattern, block) for pattern, _ in PYTHON_SKIPPED)]
    assert any("sequence_token" in block for block in blocks), "the token-rewards example (docs/REWARDS.md) is gone"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"documented Python block failed:\n{block[:300]}\n{result.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("document", DOCUMENTS)
def test_documented_commands_run(document, tmp_path):
    commands = fenced_commands((ROOT / document).read_text())
    cwd = sandbox(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    ran = []
    for command in commands:
        if skip_reason(command):
            continue
        argv = runnable_argv(command)
        try:
            result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{document}: `{command}` did not finish in {COMMAND_TIMEOUT_S} s")
        assert result.returncode == 0, (
            f"{document}: `{command}` failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
        ran.append(command)
        if "accelerate launch" in command and "scripts/train_gspo.py" in command:
            match = re.search(r"--num_processes (\d+)", command)
            world = match.group(1) if match else "8"
            banners = [line for line in result.stdout.splitlines() if line.startswith("GSPO run: ")]
            assert len(banners) == 1 and f"world size {world}," in banners[0], result.stdout[-2000:]
    if document == "recipes/README.md":  # the tiny recipe's commands are the ones that can run here
        assert any("recipes/tiny/" in c and "accelerate launch" in c for c in ran), ran
        assert (cwd / "runs" / "tiny" / "sort_digits" / "training_curves.png").is_file()
    if document == "README.md":
        assert any("scripts/quickstart.py" in c for c in ran), ran
        assert (cwd / "site" / "index.html").is_file(), "make docs wrote no site/index.html"


def test_site_pages_link_like_the_repository_files():
    """docs/hooks.py: a link means on the site what it means in the repository (a page, a file's path in code, or,
    for no file at all, the link as written, which mkdocs --strict reports); GSPOConfig's own fields are all listed."""
    hooks = site_hooks()
    readme = "[a](docs/NOISE.md#x) [b](recipes/README.md) [c](scripts/quickstart.py) [d](docs/NOPE.md) ![f](docs/demo_training_curves.png)"
    assert hooks.rewrite_links(readme, "README.md", "index.md") == (
        "[a](NOISE.md#x) [b](recipes.md) c (`scripts/quickstart.py`) [d](docs/NOPE.md) ![f](demo_training_curves.png)"
    )
    guide = "[r](../../recipes/README.md) [h](../../README.md) [s](../recipes.md) [m](../../BENCHMARKS.md)"
    assert hooks.rewrite_links(guide, "docs/reference/cli.md", "reference/cli.md") == (
        "[r](../recipes.md) [h](../index.md) [s](../recipes.md) [m](../benchmarks.md)"
    )
    from trl_gspo import GSPOConfig

    table = hooks.generated_markdown("<!-- generated: config fields -->")
    assert [row.split("`")[1] for row in table.splitlines()[2:]] == list(GSPOConfig.__annotations__)
    with pytest.raises(ValueError, match="expected one of"):
        hooks.generated_markdown("<!-- generated: nothing -->")


# Phrases that describe how a measurement was organised rather than what a user runs: a user cannot act on them.
NOT_ABOUT_THE_PROJECT = re.compile(r"lent to|was lent|no device|a lease|device time|carry=|run\(command=|device lease")


def test_user_facing_files_speak_of_the_project_only():
    """README, BENCHMARKS, docs/, recipes/, the plugin and the benchmarks say what a user runs (e.g. `bash
    benchmarks/gpu_check.sh` on an NVIDIA GPU), never how a measurement was scheduled."""
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    for folder, pattern in (("docs", "*.md"), ("recipes", "*"), ("trl_gspo", "*.py"), ("benchmarks", "*")):
        files += [path for path in (ROOT / folder).rglob(pattern) if path.is_file() and path.suffix != ".png"]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if NOT_ABOUT_THE_PROJECT.search(line)
    ]
    assert not found, "\n".join(found)
