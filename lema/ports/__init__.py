"""The ports: typing.Protocol interfaces the application needs (WeightSource, Device, MetricsSink)."""
