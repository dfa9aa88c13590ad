"""Shared test fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from oracle_processing import build_reference_processor

# kernels are not measured in tests (the preferred kernel of each op runs, as forced routes do, and no file
# of choices is written): tests of the measuring turn it on themselves
os.environ.setdefault("IDEFICS2_KERNEL_TUNING", "0")
# the C kernels are built once for the whole run, its subprocesses included, into a folder of its own (not the
# user's cache)
if "IDEFICS2_C_KERNELS_CACHE" not in os.environ:
    os.environ["IDEFICS2_C_KERNELS_CACHE"] = tempfile.mkdtemp(prefix="idefics2-tests-ckernels-")
    atexit.register(shutil.rmtree, os.environ["IDEFICS2_C_KERNELS_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def reference_processor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers-saved Idefics2 processor folder (Mistral-7B vocabulary, image_seq_len 64, no splitting,
    idefics2-8b chat template). Read-only: copy it before changing files."""
    return build_reference_processor(tmp_path_factory.mktemp("reference_processor"))


@pytest.fixture
def interrupted_third_submit():
    """A stand-in for Engine.submit that, asked for a third request, waits for the first two answers and
    raises KeyboardInterrupt (a Ctrl-C in the middle of a batch); the real submit is its `.real`."""
    from idefics2.serving.engine import Engine

    submit, handles = Engine.submit, []

    def interrupted_third(self, *args, **kwargs):
        if len(handles) == 2:
            for handle in handles:
                handle.result()
            raise KeyboardInterrupt
        handles.append(submit(self, *args, **kwargs))
        return handles[-1]

    interrupted_third.real = submit
    return interrupted_third
