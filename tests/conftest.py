"""Shared pytest setup: make the repository root importable from any directory, and have pytest explain
failed asserts of the shared helpers in recipe_runs.py."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

if not torch.cuda.is_available():  # our Triton kernels then run on CPU tensors, through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is first imported


def _patch_the_language_once_a_launch():
    """Triton's interpreter patches the ``triton.language`` modules that a kernel's module sees for a
    launch, and again at every call of a ``@triton.jit`` helper inside it (about 2 ms a call: it lists
    the modules' members), though nothing has changed; our kernels call helpers at every frame, and
    that took a fifth of their interpreted time (tests/test_scan_triton.py 168 -> 133 s). Within a
    launch, a helper whose module was patched already (ours, not Triton's own ``tl.zeros`` and the
    like) is not patched again. Left as it is where the interpreter's internals differ."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if patch_lang is None or not hasattr(interpreter, "_LangPatchScope"):
        return
    patched = set()  # during a launch: the ids of the module globals whose language modules are patched

    def patch_once(fn):
        if id(fn.__globals__) in patched:
            return None  # a helper's call, whose caller discards the patch
        scope = patch_lang(fn)
        if not patched:  # a launch begins: its patch is undone at its end
            restore = scope.restore

            def restore_and_end_launch():
                patched.clear()
                restore()

            scope.restore = restore_and_end_launch
        patched.add(id(fn.__globals__))
        return scope

    interpreter._patch_lang = patch_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_a_launch()

pytest.register_assert_rewrite("recipe_runs")

import reliability_report  # noqa: E402  (tests/ is on sys.path once pytest imports this conftest)


@pytest.fixture
def no_tf32():
    """SpeechBrain turns TF32 on at import (speechbrain.utils.quirks): plain float32 here."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pytest_addoption(parser):
    parser.addoption(
        reliability_report.WRITE_OPTION,
        action="store_true",
        help="write the reliability rows into the tracked RELIABILITY.md (else into results/RELIABILITY.md)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: fault-injection test that records a row of RELIABILITY.md")


def pytest_sessionfinish(session):
    """Writes the rows the reliability tests recorded (see tests/reliability_report.py): into the tracked
    RELIABILITY.md with --write-reliability, else into the ignored results/RELIABILITY.md. A run of all of them
    that passes rewrites the table, any other run updates its own rows."""
    option, tests = session.config.option, os.path.dirname(os.path.abspath(__file__))
    whole_suite = all(os.path.abspath(arg) in (tests, os.path.dirname(tests)) for arg in session.config.args)
    complete = option.markexpr == "reliability" and not option.keyword and whole_suite and not session.testsfailed
    tracked = session.config.getoption(reliability_report.WRITE_OPTION)
    path = reliability_report.REPORT_PATH if tracked else reliability_report.SCRATCH_REPORT_PATH
    reliability_report.write_report(path, replace=complete)
