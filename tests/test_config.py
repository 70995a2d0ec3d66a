"""qolora.config: adapter options that are not numbers of the right kind are ConfigErrors, at every entry
(AdapterConfig, prepare, finetune, the CLI's one error line), before the model loads."""

from __future__ import annotations

import math

import pytest

from qolora import AdapterConfig, ConfigError, finetune, prepare
from qolora.cli.commands import main
from tiny_runs import error_line, run_options


@pytest.mark.parametrize("options, message", [
    ({"seed": "x"}, "seed='x'"),  # before: TypeError
    ({"seed": 1.5}, "seed=1.5"),
    ({"alpha": math.inf}, "alpha=inf"),  # before: accepted
    ({"alpha": math.nan}, "alpha=nan"),
])
def test_bad_adapter_options_are_config_errors(tiny_inputs, options, message, no_prepare, tmp_path):
    model, data = tiny_inputs
    with pytest.raises(ConfigError, match=message):
        AdapterConfig(bits=4, rank=4, **options).validate()
    with pytest.raises(ConfigError, match=message):
        prepare(model, 4, 4, progress=False, **options)
    with pytest.raises(ConfigError, match=message):
        finetune(model, data, **run_options(tmp_path / "o", adapter_options={"device": "cpu", **options}))


def test_cli_alpha_inf_is_one_line(tiny_inputs, tmp_path, capsys):
    model, data = tiny_inputs
    assert main(["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "o"),
                 "--alpha", "inf"]) == 2
    assert "alpha=inf" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
