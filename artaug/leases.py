"""Lease objects on object stores, for `artaug.runlock`: create only if absent, replace or delete
only if unchanged (S3 If-None-Match / If-Match, GCS ifGenerationMatch). A store's `version` is the
object's ETag (S3) or generation (GCS). boto3 (S3) and google-cloud-storage (GCS) load on first use.
"""

from __future__ import annotations

import json
import time

from artaug.errors import ArtaugError

_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "409", "412"}


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


def holder(body: bytes) -> dict | None:
    """The owner record of a lease (host, pid, since, token, expires); None when unreadable."""
    try:
        holder = json.loads(body)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and {"host", "pid", "token"} <= holder.keys() else None


class S3Store:
    """One S3 object; the endpoint and credentials come from the AWS_* environment, as for pyarrow."""

    def __init__(self, uri: str):
        try:
            import boto3
            from botocore.exceptions import ClientError
        except ImportError:
            raise ArtaugError("an s3:// run directory needs boto3 for its lock: pip install boto3") from None
        self.bucket, self.key = _split(uri)
        self.client, self.ClientError = boto3.client("s3"), ClientError

    def _conflict(self, err) -> bool:
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(err.response.get("Error", {}).get("Code")) in _CONFLICT or status in (404, 409, 412)

    def _put(self, body: bytes, **condition) -> str | None:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]
        except self.ClientError as err:
            if self._conflict(err):
                return None
            raise

    def create(self, body: bytes) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def get(self) -> tuple[dict | None, str, float] | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.ClientError as err:
            if self._conflict(err):
                return None
            raise
        age = time.time() - got["LastModified"].timestamp()
        return holder(got["Body"].read()), got["ETag"], age

    def swap(self, body: bytes, version: str, own: bool) -> str | None:
        return self._put(body, IfMatch=version)

    def delete(self, version: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)


class GcsStore:
    """One GCS object (google-cloud-storage; credentials as for any Google client)."""

    def __init__(self, uri: str):
        try:
            from google.api_core.exceptions import NotFound, PreconditionFailed
            from google.cloud import storage as gcs
        except ImportError:
            raise ArtaugError(
                "a gs:// run directory needs google-cloud-storage for its lock:"
                " pip install google-cloud-storage"
            ) from None
        bucket, key = _split(uri)
        self.bucket, self.key = gcs.Client().bucket(bucket), key
        self.missed = (NotFound, PreconditionFailed)

    def _put(self, body: bytes, generation: int) -> int | None:
        blob = self.bucket.blob(self.key)
        try:
            blob.upload_from_string(body, if_generation_match=generation)
        except self.missed:
            return None
        return blob.generation

    def create(self, body: bytes) -> int | None:
        return self._put(body, 0)

    def get(self) -> tuple[dict | None, int, float] | None:
        blob = self.bucket.get_blob(self.key)
        if blob is None:
            return None
        try:
            body = blob.download_as_bytes(if_generation_match=blob.generation)
        except self.missed:
            return None
        return holder(body), blob.generation, time.time() - blob.updated.timestamp()

    def swap(self, body: bytes, version: int, own: bool) -> int | None:
        return self._put(body, version)

    def delete(self, version: int) -> None:
        self.bucket.blob(self.key).delete(if_generation_match=version)
