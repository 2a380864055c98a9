"""The Python client: commands, searches and file loading over Kafka.

Installs and imports with the wire contract only (no hnswlib, annoy or S3 client):
`pip install lhv` gives this package and the `lhv` command line's client verbs.
"""

from worker.client.client import (
    ClientClosed,
    Hit,
    Hits,
    Items,
    LhvClient,
    NotAcknowledged,
    ShardsMissing,
    WriteResult,
    encode_vector,
)

__all__ = [
    "ClientClosed",
    "Hit",
    "Hits",
    "Items",
    "LhvClient",
    "NotAcknowledged",
    "ShardsMissing",
    "WriteResult",
    "encode_vector",
]
