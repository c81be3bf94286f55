"""Citations a reader can follow: no tracked text file cites notes that do not ship with the repository.

Comments, docstrings and yaml comments cite the papers (arXiv ids), the released code, or a document
of this repository (README.md, RESULTS.md, RELIABILITY.md) instead.
"""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Split so that this file does not cite them itself.
UNSHIPPED_NOTES = ["conmamba" + ".md", "madeon" + ".md", "DESIGN" + ".md", "performance" + ".md"]
TEXT_SUFFIXES = (".py", ".yaml", ".md", ".txt", ".cfg", ".toml", ".sh")


def tracked_text_files():
    try:
        listing = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [path for path in listing.stdout.splitlines() if path.endswith(TEXT_SUFFIXES) or path.startswith(".ci/")]


def test_no_tracked_file_cites_notes_that_do_not_ship():
    citing = []
    for path in tracked_text_files():
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full):
            continue
        with open(full, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                citing += [f"{path}:{number}: {name}" for name in UNSHIPPED_NOTES if name in line]
    assert not citing, "cite the paper or a shipped document instead:\n" + "\n".join(citing)
