"""The command line's verb dispatch: global options before the verb, errors as one line."""

from __future__ import annotations

import pytest

from mambapath import cli


@pytest.mark.parametrize("argv", [
    ["--log-level", "WARNING", "check-config", "--config", "{missing}"],
    ["--log-level=WARNING", "check-config", "--config", "{missing}"],
    ["check-config", "--config", "{missing}"],
])
def test_verb_is_found_after_global_options(argv, tmp_path, capsys):
    missing = tmp_path / "no_such_config.yaml"
    argv = [a.replace("{missing}", str(missing)) for a in argv]
    # the verb's own parser ran (it knows --config) and the error names the missing file
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mambapath check-config: error:")
    assert "no_such_config.yaml" in err


def test_no_verb_prints_the_verbs(capsys):
    assert cli.main(["--log-level", "ERROR"]) == 0
    out = capsys.readouterr().out
    for verb in cli.COMMANDS:
        assert verb in out
