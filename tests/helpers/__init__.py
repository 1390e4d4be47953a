"""Shared test helpers: real devices and servers, the agent process, bounded waits, and parts of
the tests' own that inject faults (fault_proxy).

Test modules import from here (`from helpers.wait import wait_for`), never from each other or
from conftest.py; fixtures stay in conftest.py. See tests/README.md for what lives where.
"""
