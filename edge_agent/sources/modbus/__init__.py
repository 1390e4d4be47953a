"""Modbus TCP and RTU: the source, the shared link, the read planner, decoding, the deadband
filter, `probe` and the `check-config --plan` printout.

Import the modules themselves: this package imports nothing, so `check-config --plan` (plan,
decode) does not load the client library.
"""
