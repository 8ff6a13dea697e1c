"""Training data: webdataset shards of (image, caption)."""

from dmm.data.webdata import ShardStream, expand_urls, to_tensor

__all__ = ["ShardStream", "expand_urls", "to_tensor"]
