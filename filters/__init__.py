"""Stages: row-wise Arrow-batch stages (decode, caption, clip, download, recaption) and global
DataFrame functions (dedup, balance)."""
