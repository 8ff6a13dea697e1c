"""Bad training data is refused naming the shard and the sample; shard globs are expanded."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from dmm.data import DataError, ShardStream, expand_urls
from dmm.testing import write_shards


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path, samples: dict[str, dict[str, bytes]]):
    """A real webdataset shard: {key: {ext: bytes}}."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def first_batch(urls, **kw):
    return next(iter(ShardStream([str(u) for u in urls], batch_size=2, resolution=16, shuffle_buffer=1, **kw)))


def good(n: int, start: int = 0) -> dict:
    return {f"{k:08d}": {"png": png(k), "txt": b"a red circle", "json": b'{"caption": "a red circle"}'}
            for k in range(start, start + n)}


@pytest.mark.parametrize("files, kw, message", [
    ({"png": png(), "json": b'{"caption": "x"}'}, {},
     "no 'txt' caption (keys: json, png); set data.caption_key"),
    ({"jpg": png(), "txt": b"x"}, {}, "no 'png' image (keys: jpg, txt); set data.image_key"),
    ({"png": b"\x89PNG\r\n\x1a\n not really", "txt": b"x"}, {}, "'png' is not a readable image (cannot identify"),
    ({"png": png()[:60], "txt": b"x"}, {}, "'png' is not a readable image ("),
    ({"png": png(), "json": b'{"text": "x"}'}, {"caption_key": "json"}, "cannot read a caption from 'json' (KeyError"),
])
def test_a_bad_sample_names_shard_and_key(tmp_path, files, kw, message):
    shard = write_tar(tmp_path / "shard-00001.tar", {**good(1), "00000017": files, **good(2, start=18)})
    with pytest.raises(DataError) as err:
        for _ in ShardStream([str(shard)], batch_size=2, resolution=16, shuffle_buffer=1, **kw):
            pass
    assert str(err.value).startswith(f"data: shard {shard}, sample 00000017: {message}")


def test_a_bad_sample_in_a_dataloader_worker_gives_the_same_one_line_error(tmp_path):
    shard = write_tar(tmp_path / "shard-00001.tar", {**good(3), "00000017": {"png": png(), "json": b"{}"}})
    with pytest.raises(DataError) as err:
        for _ in ShardStream([str(shard)], batch_size=2, resolution=16, shuffle_buffer=1, num_workers=1):
            pass
    assert str(err.value) == (f"data: shard {shard}, sample 00000017: no 'txt' caption (keys: json, png); "
                              "set data.caption_key")


def test_garbage_and_truncated_tar_files_are_named(tmp_path):
    [ok] = write_shards(tmp_path / "ok", 4, per_shard=4)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar file at all " * 512)  # 11264 bytes: a whole number of blocks
    with pytest.raises(DataError, match=rf"^data: shard {garbage}: not a readable tar file \(invalid header\); "
                                        "re-write it or remove it from data.shards"):
        first_batch([garbage])
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(ok.read_bytes()[:3000])
    with pytest.raises(DataError, match=rf"^data: shard {truncated} is 3000 bytes, not a whole number of 512-byte "
                                        "tar blocks: it is truncated"):
        expand_urls([str(ok), str(truncated)])
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^data: shard {empty} is empty \(0 bytes\)"):
        expand_urls([str(empty)])


def test_glob_patterns_are_expanded_sorted_and_must_match(tmp_path):
    shards = write_shards(tmp_path / "d", 12, per_shard=4)
    (tmp_path / "d" / "notes.txt").write_text("not a shard")
    assert expand_urls([str(tmp_path / "d" / "*.tar")]) == [str(s) for s in sorted(shards)]
    assert expand_urls([str(tmp_path / "d" / "shard-0000[02].tar")]) == [str(shards[0]), str(shards[2])]
    with pytest.raises(FileNotFoundError, match=rf"data.shards: '{tmp_path}/nowhere/\*.tar' matches no file"):
        expand_urls([str(tmp_path / "nowhere" / "*.tar")])
    # Brace patterns keep working, also together with a glob.
    assert expand_urls([str(tmp_path / "d" / "shard-{00000..00001}.tar")]) == [str(s) for s in shards[:2]]
    # Each brace alternative must match, like each brace-expanded file must exist.
    with pytest.raises(FileNotFoundError, match=rf"'{tmp_path}/{{d,e}}/\*-00002.tar' \({tmp_path}/e/\*-00002.tar\) "
                                                "matches no file"):
        expand_urls([str(tmp_path / "{d,e}" / "*-00002.tar")])
    other = write_shards(tmp_path / "e", 4, per_shard=4)
    assert expand_urls([str(tmp_path / "{e,d}" / "*-00000.tar")]) == [str(other[0]), str(shards[0])]
    with pytest.raises(FileNotFoundError, match="data shard not found"):
        expand_urls([str(tmp_path / "d" / "shard-{00000..00005}.tar")])


def test_good_shards_still_stream(tmp_path):
    shards = write_shards(tmp_path, 8, per_shard=4)
    batch = first_batch(expand_urls([str(tmp_path / "*.tar")]))
    assert batch["pixels"].shape == (2, 3, 16, 16) and len(batch["captions"]) == 2
    shard = write_tar(tmp_path / "json.tar", {"00000001": {"png": png(), "json": json.dumps({"caption": "hi"}).encode()},
                                              "00000002": {"png": png(1), "json": b'{"caption": "yo"}'}})
    assert sorted(first_batch([shard], caption_key="json")["captions"]) == ["hi", "yo"]
    assert shards
