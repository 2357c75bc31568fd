"""The pure core of roomcast: models, validation, rules and the ports it calls.

Nothing in this package opens a socket or imports a framework; the adapters and transports
around it do the I/O.
"""
