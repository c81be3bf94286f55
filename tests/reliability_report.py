"""The reliability report: the fault-injection tests record what they observed, and the session-finish hook in
conftest.py merges those rows into a report, so the table always shows outcomes the test suite measured rather
than prose someone wrote.

An ordinary test run writes results/RELIABILITY.md (ignored by git), so that running the tests leaves a clone
clean; the tracked RELIABILITY.md at the repository root is rewritten only on request (``--write-reliability``).
"""

import datetime
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_PATH = os.path.join(ROOT, "RELIABILITY.md")  # tracked: written with --write-reliability only
SCRATCH_REPORT_PATH = os.path.join(ROOT, "results", "RELIABILITY.md")  # ignored: every other test run
WRITE_OPTION = "--write-reliability"
SELECT_COMMAND = f"python -m pytest tests -m reliability {WRITE_OPTION}"

_rows = {}


def record(scenario, what_happened):
    """Records one row: the fault injected and the outcome the test observed (paths, counts, messages).
    A later record of the same scenario in the session replaces the earlier one."""
    _rows[_cell(scenario)] = _cell(what_happened)


def _cell(text):
    """One line of text that is safe inside a markdown table cell, with paths relative to the repository
    pytest's temporary folders written <tmp> and checkpoint times <time>, so that the report does not change from run to run or
    machine to machine for nothing."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text)).replace(ROOT + os.sep, "")  # no terminal colour codes
    text = re.sub(r"\S*/pytest-of-[^/\s]+/pytest-\d+/[^/\s]+", "<tmp>", text)
    text = re.sub(r"CKPT\+\d{4}-\d\d-\d\d\+\d\d-\d\d-\d\d\+\d\d", "CKPT+<time>", text)  # checkpoint names
    return " ".join(text.split()).replace("|", "\\|")


def _existing_rows(path):
    """The table rows of an existing report, so that a partial test run updates its rows and keeps the others."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as report:
        lines = [line.strip() for line in report if line.startswith("| ")]
    rows = {}
    for line in lines[2:]:  # the first two are the header and its separator
        cells = re.split(r"(?<!\\)\|", line.strip("|"))
        if len(cells) == 2:
            rows[cells[0].strip()] = cells[1].strip()
    return rows


def write_report(path=REPORT_PATH, replace=False):
    """Writes this session's rows to the report at path, sorted by scenario (ignoring case): in place of its
    rows if replace, else merged with them by scenario. Does nothing when no row was recorded."""
    if not _rows:
        return
    merged_with = path if os.path.exists(path) else REPORT_PATH  # a first scratch report starts from the tracked one
    rows = dict(_rows) if replace else {**_existing_rows(merged_with), **_rows}
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    lines = [
        "# Reliability report",
        "",
        "Faults injected into the recipes by the test suite, and what the tests observed. This file is generated:",
        f"`{SELECT_COMMAND}` reruns these tests and rewrites the table ({WRITE_OPTION} with fewer tests",
        "updates their rows); without it, test runs write their rows to results/RELIABILITY.md, which git ignores.",
        f"Last updated {today} (UTC).",
        "",
        "| fault injected | what happened |",
        "| --- | --- |",
    ]
    lines += [f"| {scenario} | {rows[scenario]} |" for scenario in sorted(rows, key=str.lower)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as report:
        report.write("\n".join(lines) + "\n")
