"""Training data: webdataset shards of (image, caption)."""

from dmm.data.webdata import DataError, ShardStream, expand_urls, to_tensor

__all__ = ["DataError", "ShardStream", "expand_urls", "to_tensor"]
