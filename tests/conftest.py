"""Shared pytest setup: make the repository root importable from any directory, and have pytest explain
failed asserts of the shared helpers in recipe_runs.py."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.register_assert_rewrite("recipe_runs")
