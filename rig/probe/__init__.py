"""Probes of a board from the network, as an attacker on the LAN sees it.

:mod:`rig.probe.tcp_ports` is a TCP connect scan of a board's address (EN 303 645 5.6-1: every
network interface the device exposes must be one its supplier documents), with the loopback
subtlety of virtual boards worked out: a host listener on ``0.0.0.0`` answers on every
``127.x`` address, so it is told apart from the board's own.
"""
