"""device_registry.json: every value that reaches ssh or a remote script is checked once, when read."""

import re

import pytest

from dnnpipe.deploy.registry import parse_registry
from dnnpipe.errors import ConfigError


@pytest.mark.parametrize("devices, message", [
    ([{"device_id": 1, "host": "a"}, {"device_id": 1, "host": "b"}], "device_id 1 appears twice"),
    ([{"device_id": 1, "host": "a", "port": 70000}], "'port' must be a port number 1-65535, got 70000"),
    ([{"device_id": 1, "host": "a", "runtime_port": "x"}], "'runtime_port' must be a port number"),
    ([{"device_id": 0, "host": "a"}], "'device_id' must be a positive integer, got 0"),
    ([{"device_id": 1}], "'host' must be a host name"),
    ([{"device_id": 1, "host": "a", "pasword": "x"}], "unknown key 'pasword'"),
    ([], "at least one device"),
    # values that ssh would take for options, or a shell for commands
    ([{"device_id": 1, "host": "-oProxyCommand=touch x"}], "'host' must be a host name"),
    ([{"device_id": 1, "host": "a b"}], "'host' must be a host name"),
    ([{"device_id": 1, "host": "a;b"}], "'host' must be a host name"),
    ([{"device_id": 1, "host": "a", "user": "-oProxyCommand=x"}], "'user' must be a user name"),
    ([{"device_id": 1, "host": "a", "username": "a b"}], "'user' must be a user name"),
    ([{"device_id": 1, "host": "a", "remote_dir": "x\n!touch y"}], "'remote_dir' holds a control character"),
    ([{"device_id": 1, "host": "a", "remote_dir": "-rf"}], "'remote_dir' must not start with '-'"),
    ([{"device_id": 1, "host": "a", "remote_dir": "~bob/x"}], "only '~' and '~/...' (your home) are expanded"),
    ([{"device_id": 1, "host": "a", "identity_file": "k\r"}], "'identity_file' holds a control character"),
    ([{"device_id": 1, "host": "a", "python": "python3 -c x"}], "'python' must be an interpreter path or name"),
    ([{"device_id": 1, "host": "a", "python": "$(x)"}], "'python' must be an interpreter path or name"),
    ([{"device_id": 1, "host": "a", "python": "-c"}], "'python' must be an interpreter path or name"),
])
def test_registry_validation(devices, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        parse_registry({"devices": devices}, "reg.json")
    assert str(error.value).startswith("reg.json") and "\n" not in str(error.value)


def test_legitimate_values_pass_unchanged():
    entries = [{"device_id": 1, "host": "xavier-01.lan", "username": "rtos_2", "remote_dir": "~"},
               {"device_id": 2, "host": "192.168.0.7", "remote_dir": "/srv/dnn pipe/\u00e9t\u00e9 'x' $(y)",
                "python": "~/venv/bin/python3.11"},
               {"device_id": 3, "host": "fe80::1", "identity_file": "~/.ssh/id ed25519"},
               {"device_id": 4, "host": "local", "python": "/usr/bin/python3"}]
    registry = parse_registry({"devices": entries}, "reg.json")
    assert registry[1].user == "rtos_2" and registry[1].address == "rtos_2@xavier-01.lan"
    assert registry[2].remote_dir == entries[1]["remote_dir"] and registry[2].interpreter == "~/venv/bin/python3.11"
    assert registry[3].host == "fe80::1" and registry[3].interpreter == "python3"
    assert registry[4].is_local and registry[4].interpreter == "/usr/bin/python3"
