"""experiments.host_devices: the simulated-device flag, set once, never over a user's."""

import os

import pytest

from experiments import host_devices


def test_simulate_adds_the_flag_once_and_keeps_a_users_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    host_devices.simulate(4)
    host_devices.simulate(8)
    flags = os.environ["XLA_FLAGS"]
    assert flags == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=4"
    monkeypatch.delenv("XLA_FLAGS")
    host_devices.simulate(2)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    with pytest.raises(ValueError, match="count"):
        host_devices.simulate(0)
