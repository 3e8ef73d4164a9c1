"""Storage against a real S3 server (moto's standalone server on 127.0.0.1)."""
from __future__ import annotations

import os

from pipelines.io import storage


def test_multipart_upload_listing_and_reads(s3_server, tmp_path, monkeypatch):
    storage.s3_client.cache_clear()  # pick up the server's endpoint from the environment
    s3 = storage.s3_client()
    assert s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 11}  # back-off, 10 retries
    s3.create_bucket(Bucket="store")
    monkeypatch.setattr(storage, "MULTIPART_BYTES", 5 << 20)
    data = os.urandom(12 << 20)
    local = tmp_path / "shard.tar"
    local.write_bytes(data)
    storage.publish_file(str(local), "s3://store/out/shards/k-000000.tar")
    assert not local.exists()  # the staging copy is gone once published
    head = s3.head_object(Bucket="store", Key="out/shards/k-000000.tar")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5 MB
    assert storage.read_bytes("s3://store/out/shards/k-000000.tar") == data
    storage.write_bytes("s3://store/out/shards/index.json", b"{}")
    assert storage.list_files("s3://store/out/shards") == [
        "s3://store/out/shards/index.json", "s3://store/out/shards/k-000000.tar"]
    assert storage.list_files("s3://store/out/shards/*.tar") == ["s3://store/out/shards/k-000000.tar"]
    assert storage.exists("s3://store/out/shards/index.json") and not storage.exists("s3://store/nope")
    storage.remove_tree("s3://store/out")
    assert storage.list_files("s3://store/out") == []
    storage.s3_client.cache_clear()
