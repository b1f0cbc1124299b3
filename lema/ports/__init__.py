"""Ports: typing.Protocol interfaces between the pure core and the adapters."""
