"""Shared fixtures: tiny checkpoints (built once per session), the test-only backend, and CONTRIBUTING.md's
checklist run once for the tests of the backend template and of the checklist itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import checklist  # noqa: E402
import tiny_models  # noqa: E402
import toy_backend  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One bf16 checkpoint per architecture in :data:`tiny_models.ARCHITECTURES`."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: tiny_models.build(arch, root / arch) for arch in tiny_models.ARCHITECTURES}


@pytest.fixture(scope="session")
def llama(checkpoints) -> Path:
    return checkpoints["llama"]


@pytest.fixture
def toy():
    """The toy backend registered for one test, its call log cleared."""
    import qcore

    plugin = toy_backend.ToyPlugin()
    qcore.register_plugin(plugin, "toy")
    toy_backend.CALLS.clear()
    yield plugin
    qcore.unregister_plugin("toy")


@pytest.fixture
def toy_only(monkeypatch):
    """The toy backend as the only plugin for one test (no entry points), discovery restored afterwards."""
    import qcore

    monkeypatch.setenv("QCORE_DISABLE_PLUGIN_AUTOLOAD", "1")
    qcore.reset_plugins()
    qcore.register_plugin(toy_backend.ToyPlugin(), "toy")
    yield
    qcore.reset_plugins()


@pytest.fixture(scope="session")
def checklist_run(tmp_path_factory) -> checklist.ChecklistRun:
    """CONTRIBUTING.md's "Adding a backend" commands, run as written on a freshly generated backend package."""
    return checklist.run(tmp_path_factory.mktemp("checklist"))
