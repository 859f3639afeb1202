"""Unknown `ROUTET2I_*` environment variables are warned about (a typo was silently ignored), with the
setting they probably meant; known ones and the token variable are not."""

from __future__ import annotations

import logging

from routet2i.config import load_config, unknown_env_vars


def test_unknown_routet2i_variables_are_warned_with_a_guess(caplog):
    env = {
        "ROUTET2I_ENDPOINT": "host:1",  # the TOML key; the variable is ROUTET2I_CLOUD
        "ROUTET2I_TARGET_CLOUD_RAET": "0.3",  # a typo
        "ROUTET2I_CLOUD": "host:2",
        "ROUTET2I_TOKEN": "t",
        "ROUTET2I_LOG_LEVEL": "INFO",
        "ROUTET2I_STATE_FILE": "",
        "ROUTET2I_DECISION_LOG": "",
        "HOME": "/nowhere",
    }
    caplog.set_level(logging.WARNING)
    cfg = load_config(None, environ=env)
    assert cfg.cloud == "host:2" and cfg.token == "t"
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2, messages
    assert any("ROUTET2I_ENDPOINT" in m and "ROUTET2I_CLOUD?" in m for m in messages)
    assert any("ROUTET2I_TARGET_CLOUD_RAET" in m and "ROUTET2I_TARGET_CLOUD_RATE?" in m for m in messages)


def test_custom_token_variable_and_tool_variables_are_known():
    env = {"ROUTET2I_FLEET_TOKEN": "x", "ROUTET2I_DEMO_CACHE": "/c", "ROUTET2I_CACHE_DIR": "/d"}
    assert unknown_env_vars(env, token_env="ROUTET2I_FLEET_TOKEN") == []
    assert len(unknown_env_vars(env)) == 1  # with the default token variable, FLEET_TOKEN is unknown
