"""OPC UA: the source (session, subscriptions, polling), security and certificates, the mapping
of DataValues to readings, and `browse`.

Import the modules themselves: this package imports nothing, so asyncua is loaded only by a
configuration that uses it.
"""
