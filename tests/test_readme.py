"""The README's step-by-step flow, run as written on a fresh copy of the working tree: every command works, the
copy stays clean."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

WALKTHROUGH = re.compile(r"<!-- walkthrough: start -->(.*?)<!-- walkthrough: end -->", re.S)


def walkthrough_blocks(readme: str) -> list[str]:
    section = WALKTHROUGH.search(readme)
    assert section, "README.md has no walkthrough section"
    return re.findall(r"```bash\n(.*?)```", section.group(1), re.S)


def test_the_walkthrough_names_the_paper_commands():
    blocks = "\n".join(walkthrough_blocks((ROOT / "README.md").read_text()))
    for command in ("model_partitioner.py", "deployer.py", "make-model", "profile", "run-local"):
        assert command in blocks


def clean_copy(destination: Path) -> Path:
    """What a commit of the working tree as it is would hold (tracked files as edited, new files git does not
    ignore; nothing ignored, no build products), as a fresh repository: so the walkthrough tests uncommitted
    work too, and `git status` there shows what the README's commands leave behind."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = ROOT / rel
        if source.is_file() or source.is_symlink():  # a tracked file deleted in the working tree is left out
            (destination / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / rel, follow_symlinks=False)
    git = ["git", "-C", str(destination), "-c", "user.name=walkthrough", "-c", "user.email=walkthrough@invalid"]
    for step in (["init", "-q"], ["add", "-A"], ["commit", "-q", "--no-verify", "-m", "the working tree"]):
        subprocess.run([*git, *step], check=True, capture_output=True, timeout=60)
    return destination


def test_the_copy_holds_uncommitted_work(tmp_path):
    """The walkthrough runs on what is in the working tree, not on the last commit (it used to skip then)."""
    probe = ROOT / "tests" / f"untracked-{tmp_path.name}.txt"
    probe.write_text("new")
    try:
        copy = clean_copy(tmp_path / "copy")
    finally:
        probe.unlink()
    assert (copy / "tests" / probe.name).read_text() == "new"
    assert (copy / "README.md").read_bytes() == (ROOT / "README.md").read_bytes()
    assert not (copy / ".venv").exists() and not list(copy.rglob("__pycache__"))


@pytest.mark.slow
def test_readme_walkthrough_on_a_fresh_copy(tmp_path):
    clone = clean_copy(tmp_path / "clone")
    (clone / ".venv").symlink_to(Path(sys.prefix))  # the README's .venv, already installed
    for block in walkthrough_blocks((clone / "README.md").read_text()):
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=clone, capture_output=True,
                                text=True, timeout=600, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                             "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": str(tmp_path)})
        assert result.returncode == 0, f"{block}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert status == "", f"the README's commands left files git sees:\n{status}"
