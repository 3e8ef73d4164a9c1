"""Readers, the shard writer and storage (local paths and s3:// through boto3)."""
