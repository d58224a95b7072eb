"""The README's step-by-step flow, run as written on a fresh clone: every command works, the clone stays clean."""

import re
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


@pytest.mark.slow
def test_readme_walkthrough_on_a_fresh_clone(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                      capture_output=True, text=True).stdout.strip():
        pytest.skip("uncommitted changes: a clone would not test them")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    (clone / ".venv").symlink_to(Path(sys.prefix))  # the README's .venv, already installed
    for block in walkthrough_blocks((clone / "README.md").read_text()):
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=clone, capture_output=True,
                                text=True, timeout=600, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                             "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": str(tmp_path)})
        assert result.returncode == 0, f"{block}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert status == "", f"the README's commands left files git sees:\n{status}"
