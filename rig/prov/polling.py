"""Polling, the way the phone app learns anything: neither the RainMaker REST API nor a device's
provisioning endpoints push (rainmaker-protocol.md §3, §4.5: the app polls mapping status, params
and ``prov-config`` status)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(fetch: Callable[[], T], done: Callable[[T], bool], timeout: float, interval: float) -> T:
    """Call *fetch* every *interval* seconds until *done* accepts its answer or *timeout* has passed;
    returns the last answer either way (the caller judges it: a wait that ran out is a finding, not an error)."""
    deadline = time.monotonic() + timeout
    value = fetch()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(interval)  # nothing to wait on: the peer has no push channel
        value = fetch()
    return value
