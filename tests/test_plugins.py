"""Plugin discovery through the ``qcore`` entry-point group, the env controls, the listing, and config errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import qcore
from qcore import plugins

FAKE_BACKEND = textwrap.dedent(
    """
    import dataclasses
    from typing import ClassVar
    import qcore

    @dataclasses.dataclass
    class FakeConfig(qcore.QuantConfig):
        quant_method: ClassVar[str] = "{method}"
        bits: int = 4

        def check(self):
            if self.bits not in (4, 8):
                raise qcore.ConfigError(f"{method} config: field 'bits' must be 4 or 8, got {{self.bits}}")

    @qcore.hookimpl
    def register_backend():
        return qcore.Backend(name="{name}", configs={{"{method}": FakeConfig}}, requires={requires},
                             presets=(qcore.Preset("{name}-4bit", {{"quant_method": "{method}"}}),))
    """
)


def install_fake(tmp_path, distribution, module, source):
    """A distribution on sys.path (dist-info with an entry point in group qcore), as pip would leave it."""
    (tmp_path / f"{module}.py").write_text(source)
    info = tmp_path / f"{distribution.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[qcore]\n{module} = {module}\n")


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    install_fake(tmp_path, "qcore-fake", "qcore_fake", FAKE_BACKEND.format(name="fake", method="fake_q", requires="()"))
    install_fake(
        tmp_path, "qcore-needy", "qcore_needy",
        FAKE_BACKEND.format(name="needy", method="needy_q", requires='("surely-not-installed-lib>=1.0",)'),
    )  # fmt: skip
    install_fake(tmp_path, "qcore-broken", "qcore_broken", "raise ImportError('libfoo.so: cannot open shared object')")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("QCORE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("QCORE_LOAD_PLUGINS", raising=False)
    plugins.reset_plugins()
    yield tmp_path
    for name in ("qcore_fake", "qcore_needy", "qcore_broken"):
        sys.modules.pop(name, None)
    plugins.reset_plugins()


def test_entry_points_are_discovered_and_a_broken_plugin_is_reported_not_fatal(fake_site):
    with pytest.warns(UserWarning, match="qcore-broken failed to load"):
        found = {info.distribution: info for info in qcore.backends()}
    fake = found["qcore-fake"]
    assert (fake.name, fake.version, fake.methods, fake.presets, fake.available) == (
        "fake", "1.2.3", ("fake_q",), ("fake-4bit",), True,
    )  # fmt: skip
    broken = found["qcore-broken"]
    assert not broken.available and "libfoo.so" in broken.reason and "pip install -U qcore-broken" in broken.reason


def test_missing_library_is_listed_with_its_pip_command(fake_site):
    with pytest.warns(UserWarning):
        needy = {info.distribution: info for info in qcore.backends()}["qcore-needy"]
    assert not needy.available
    assert needy.reason == "surely-not-installed-lib is not installed: pip install 'surely-not-installed-lib>=1.0'"


def test_load_plugins_env_restricts_to_named_distributions(fake_site, monkeypatch):
    monkeypatch.setenv("QCORE_LOAD_PLUGINS", "qcore-fake")
    plugins.reset_plugins()
    assert [info.distribution for info in qcore.backends()] == ["qcore-fake"]


def test_disable_autoload_env_loads_no_entry_point(fake_site, monkeypatch):
    monkeypatch.setenv("QCORE_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins.reset_plugins()
    assert qcore.backends() == []


def test_unavailable_backend_raises_backend_unavailable_before_loading(fake_site, llama):
    with (
        pytest.warns(UserWarning),
        pytest.raises(qcore.BackendUnavailable, match="pip install 'surely-not-installed-lib>=1.0'"),
    ):
        qcore.from_pretrained(llama, {"quant_method": "needy_q"})


def test_two_plugins_claiming_one_method_first_name_wins_and_prefer_overrides(fake_site, monkeypatch):
    install_fake(
        fake_site, "qcore-afake", "qcore_afake", FAKE_BACKEND.format(name="afake", method="fake_q", requires="()")
    )
    monkeypatch.setenv("QCORE_LOAD_PLUGINS", "qcore-fake,qcore-afake")
    plugins.reset_plugins()
    found = {info.distribution: info for info in qcore.backends()}
    assert plugins.backend_for("fake_q").distribution == "qcore-afake"
    assert not found["qcore-fake"].available
    assert "also claimed by qcore-afake" in found["qcore-fake"].reason
    assert "QCORE_PREFER=fake_q=qcore-fake" in found["qcore-fake"].reason
    monkeypatch.setenv("QCORE_PREFER", "fake_q=qcore-fake")
    plugins.reset_plugins()
    assert plugins.backend_for("fake_q").distribution == "qcore-fake"
    sys.modules.pop("qcore_afake", None)


def test_config_from_dict_dispatches_and_round_trips(fake_site, monkeypatch):
    monkeypatch.setenv("QCORE_LOAD_PLUGINS", "qcore-fake")
    plugins.reset_plugins()
    config = qcore.QuantConfig.from_dict({"quant_method": "fake_q", "bits": 8})
    assert type(config).__name__ == "FakeConfig" and config.bits == 8
    assert qcore.QuantConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "data, message",
    [
        ({"quant_method": "fake_q", "bits": "4"}, "field 'bits' must be int, got '4'"),
        ({"quant_method": "fake_q", "bits": 3}, "field 'bits' must be 4 or 8"),
        ({"quant_method": "fake_q", "bitz": 4}, r"unknown field\(s\) \['bitz'\]; valid fields are \['bits'\]"),
        ({"bits": 4}, "has no 'quant_method'"),
        ({"quant_method": "gptq_magic"}, "unknown quant_method 'gptq_magic'; installed methods: fake_q"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(fake_site, monkeypatch, data, message):
    monkeypatch.setenv("QCORE_LOAD_PLUGINS", "qcore-fake")
    plugins.reset_plugins()
    with pytest.raises(qcore.ConfigError, match=message):
        qcore.QuantConfig.from_dict(data)


@pytest.mark.parametrize(
    "method, package", [("bitsandbytes", "qcore-bnb"), ("hqq", "qcore-hqq"), ("eetq", "qcore-eetq")]
)
def test_known_method_without_its_plugin_names_the_package(monkeypatch, method, package):
    # As if no plugin were installed: no entry point is found (an installed but excluded one is named as such).
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda **selection: [])
    plugins.reset_plugins()
    try:
        with pytest.raises(qcore.ConfigError, match=f"pip install {package}"):
            qcore.QuantConfig.from_dict({"quant_method": method})
    finally:
        monkeypatch.undo()
        plugins.reset_plugins()


def test_import_qcore_and_listing_backends_import_no_torch_or_backend_library():
    code = (
        "import sys, json, qcore; qcore.backends(); "
        "print(json.dumps([m for m in ('torch', 'bitsandbytes', 'hqq', 'eetq', 'transformers') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
