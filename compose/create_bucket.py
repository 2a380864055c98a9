"""Create the LHV bucket on the compose S3 server, waiting for the server to come up.

Run by the `s3-init` service of docker-compose.yml; reads the same variables as the worker
(LHV_S3_ENDPOINT_URL, LHV_S3_BUCKET, LHV_S3_ACCESS_KEY_ID / LHV_S3_SECRET_ACCESS_KEY, else
AWS_*: `S3Config.from_env`). Exits 0 once the bucket exists.
"""

from __future__ import annotations

import os
import sys
import time

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from worker.storage.blobstore import S3Config

__all__: list[str] = []


def main() -> int:
    s3 = S3Config.from_env(os.environ)
    bucket = s3.bucket
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        config=Config(connect_timeout=5, read_timeout=10, s3={"addressing_style": "path"}),
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            print(f"created bucket {bucket}")
            return 0
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                print(f"bucket {bucket} exists")
                return 0
            error: Exception = exc
        except BotoCoreError as exc:
            error = exc
        if time.monotonic() > deadline:
            print(f"could not create bucket {bucket}: {error}", file=sys.stderr)
            return 1
        time.sleep(1)


if __name__ == "__main__":
    raise SystemExit(main())
