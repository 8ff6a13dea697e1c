import json
import os

import numpy as np
import webdataset as wds

from dmm.toyworld import write_shards
from dmm.toyworld.render import render_sample


def test_shards_roundtrip_through_webloader(tmp_path):
    styles = ["flat", "neon", "pixel"]
    paths = write_shards(tmp_path / "shards", 50, seed=3, styles=styles, samples_per_shard=16)
    assert len(paths) == 4 and all(os.path.exists(p) for p in paths)
    ds = wds.WebDataset(paths, shardshuffle=False, workersplitter=wds.split_by_worker,
                        nodesplitter=None).decode("pil").to_tuple("__key__", "png", "txt", "json")
    items = list(wds.WebLoader(ds, batch_size=None, num_workers=2))
    keys = [k for k, *_ in items]
    assert len(keys) == 50 and len(set(keys)) == 50
    by_index = {meta["index"]: (img, txt, meta) for _, img, txt, meta in items}
    assert sorted(by_index) == list(range(50))
    img, txt, meta = by_index[7]
    content, style, ref = render_sample(7, 3, styles)
    assert txt == content.caption == meta["caption"] and meta["style"] == style == styles[7 % 3]
    assert np.array_equal(np.asarray(img), np.asarray(ref))  # PNG is lossless and rendering deterministic
    # a complete set is reused, not rewritten
    mtimes = [os.path.getmtime(p) for p in paths]
    assert write_shards(tmp_path / "shards", 50, seed=3, styles=styles, samples_per_shard=16) == paths
    assert [os.path.getmtime(p) for p in paths] == mtimes
    manifest = json.loads((tmp_path / "shards" / "toyworld-manifest.json").read_text())
    assert manifest["n_samples"] == 50
