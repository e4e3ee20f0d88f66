"""The engine most integration modules run their jobs on (one per module, in process), and a
bare bucket on moto for the modules that test storage code alone."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

from tilefan.local.stack import LocalStack, local_stack
from tilefan.state.storage import TileStore

BUCKET = "tilefan-test"


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    """The embedded engine and the job service over it, functions as threads."""
    with local_stack() as running:
        yield running


@pytest.fixture
def store() -> Iterator[TileStore]:
    """A store over an empty bucket on moto's S3, in process."""
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield TileStore(BUCKET, client=client)
