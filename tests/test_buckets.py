"""Tests for `workflow.core.buckets`: the local-directory bucket and a real S3 bucket."""

from __future__ import annotations

import pytest

from workflow.core.buckets import BucketUnavailableError, LocalBucket, open_bucket


def _exercise(bucket) -> None:
    bucket.put("a/b/raw1.fits", b"first")
    bucket.put("a/c/raw2.fits", b"second")
    bucket.put("z/other.json", b"{}")
    assert bucket.get("a/b/raw1.fits") == b"first"
    assert bucket.read_head("a/c/raw2.fits", 3) == b"sec"
    assert bucket.exists("a/c/raw2.fits")
    assert not bucket.exists("a/c/missing.fits")
    assert bucket.list("a/") == ["a/b/raw1.fits", "a/c/raw2.fits"]
    assert "z/other.json" in bucket.list()
    with pytest.raises(FileNotFoundError, match=f"bucket {bucket.name}: no object 'nope'"):
        bucket.get("nope")


def test_local_bucket(tmp_path):
    bucket = open_bucket({"storage": {"endpoint_url": None, "local_root": str(tmp_path)}}, "raws")
    assert isinstance(bucket, LocalBucket)
    _exercise(bucket)
    out = bucket.download("a/b/raw1.fits", tmp_path / "dl" / "x.fits")
    assert out.read_bytes() == b"first"
    with pytest.raises(ValueError, match="escapes the bucket"):
        bucket.get("../../etc/passwd")


def test_s3_bucket_on_real_server(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    config = {"storage": {"endpoint_url": s3_server.endpoint_url, "local_root": "unused"}}
    with pytest.raises(BucketUnavailableError, match="'never-created'"):
        open_bucket(config, "never-created")
    bucket = open_bucket(config, "test-buckets-raw", create=True)
    _exercise(bucket)
