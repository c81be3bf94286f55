"""Shared pytest setup: make the repository root importable from any directory, and have pytest explain
failed asserts of the shared helpers in recipe_runs.py."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.register_assert_rewrite("recipe_runs")

import reliability_report  # noqa: E402  (tests/ is on sys.path once pytest imports this conftest)


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: fault-injection test that records a row of RELIABILITY.md")


def pytest_sessionfinish(session):
    """Writes the rows the reliability tests recorded into RELIABILITY.md (see tests/reliability_report.py):
    a run of all of them that passes rewrites the table, any other run updates its own rows."""
    option, tests = session.config.option, os.path.dirname(os.path.abspath(__file__))
    whole_suite = all(os.path.abspath(arg) in (tests, os.path.dirname(tests)) for arg in session.config.args)
    complete = option.markexpr == "reliability" and not option.keyword and whole_suite and not session.testsfailed
    reliability_report.write_report(replace=complete)
