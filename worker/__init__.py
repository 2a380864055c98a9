"""LHV worker: the service that feeds HNSW indexes from Kafka and checkpoints them to S3."""

__all__: list[str] = []
