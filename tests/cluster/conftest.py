"""Test hosts: network namespaces on this machine (``faultkit.testing.Network``).

Skipped, with the reason, where namespaces cannot be made (not root, no iproute2).
"""

import pytest

from faultkit.testing import Network, netns_unavailable


@pytest.fixture(scope="session")
def netns_reason():
    return netns_unavailable()


@pytest.fixture
def net(netns_reason):
    """A fresh network of test hosts, torn down (processes, links, namespaces) after the
    test, also when it fails."""
    if netns_reason:
        pytest.skip(f"test hosts skipped: {netns_reason}")
    with Network() as network:
        yield network
