"""DataConfig, the one options object of prepare(): defaults and validation of the fields it adds."""

from __future__ import annotations

import pytest

from soulchat.options import ConfigError, DataConfig


def test_defaults():
    options = DataConfig()
    assert options.eval_fraction == 0.05  # the same default for train and prepare
    assert (options.row_size, options.eval_seed, options.workers) == (None, 0, None)
    assert options.counselor_role == [] and options.client_role == []


@pytest.mark.parametrize("kwargs, flag", [
    ({"row_size": 100, "max_length": 200}, "--row-size"),
    ({"row_size": 256.0}, "--row-size"),
    ({"eval_seed": "1"}, "--eval-seed"),
    ({"eval_seed": True}, "--eval-seed"),
    ({"workers": 0}, "--workers"),
    ({"workers": 2.5}, "--workers"),
    ({"eval_fraction": float("nan")}, "--eval-fraction"),
    ({"eval_fraction": "0.1"}, "--eval-fraction"),
    ({"max_length": 1}, "--max-length"),
])
def test_bad_values_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        DataConfig(**kwargs)


def test_role_names_accept_one_string():
    assert DataConfig(counselor_role="doctor", client_role=["patient"]).counselor_role == ["doctor"]
