"""The conformance suite itself: its guard against silently dropped tests, and a run against the test backend."""

from __future__ import annotations

import pytest
from qcore.testing import BackendConformance


def test_overriding_a_standard_test_is_refused():
    with pytest.raises(TypeError, match="overrides or deletes the standard test test_config_round_trips"):

        class Sneaky(BackendConformance):  # noqa: F841
            def test_config_round_trips(self):
                pass


def test_deleting_a_standard_test_is_refused():
    with pytest.raises(TypeError, match="test_skip_list_is_honoured"):
        type("Deleting", (BackendConformance,), {"test_skip_list_is_honoured": None})


def test_expected_failures_must_name_real_tests():
    with pytest.raises(TypeError, match="do not exist"):
        type("Typo", (BackendConformance,), {"expected_failures": {"test_nope": "reason"}})


def test_an_expected_failure_with_a_reason_is_allowed():
    cls = type("Honest", (BackendConformance,), {"expected_failures": {"test_skip_list_is_honoured": "no skip list"}})
    assert cls.test_skip_list_is_honoured.pytestmark[0].kwargs["strict"] is True
