"""The ``pipefleet worker`` process: deployments, batching, advertisement, metrics."""

__all__: list[str] = []
