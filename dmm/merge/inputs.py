"""What a merge reads: each model's UNet weights file, found in a pipeline folder, a UNet folder or
given as a `.safetensors` file, and checked against the others from the headers alone.

Only headers are read here (no tensor), so checking N full-size models costs nothing; the merge
itself then streams tensor by tensor through sd-mecha.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class MergeError(ValueError):
    """Merge input that cannot be used as given; the message names the problem and the fix."""


@dataclass(frozen=True)
class MergeInput:
    path: Path                 # as the user gave it
    weights: Path              # the .safetensors file holding the UNet (or a whole single file)
    pipeline: Path | None      # the pipeline folder around it, whose other parts an output may reuse
    unet_dir: Path | None      # the folder holding the UNet's config.json

    def unet_config(self) -> dict | None:
        if self.unet_dir is None:
            return None
        return json.loads((self.unet_dir / "config.json").read_text())


def resolve_input(path: str | Path) -> MergeInput:
    """A pipeline folder (`unet/`), a UNet folder (`config.json` + weights) or a `.safetensors` file."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise MergeError(f"{path}: only .safetensors files can be merged (pickled checkpoints are refused); "
                             "convert it to safetensors first")
        return MergeInput(path, path, None, None)
    if not path.is_dir():
        raise MergeError(f"{path} does not exist; give a diffusers pipeline folder, a UNet folder or a "
                         ".safetensors file")
    pipeline = path if (path / "unet" / "config.json").is_file() else None
    unet_dir = path / "unet" if pipeline else path
    if not (unet_dir / "config.json").is_file():
        raise MergeError(f"{path} is neither a diffusers pipeline folder (no unet/config.json) nor a UNet folder "
                         "(no config.json)")
    weights = unet_dir / WEIGHTS_NAME
    if not weights.is_file():
        found = sorted(p.name for p in unet_dir.iterdir() if p.name != "config.json")
        raise MergeError(f"{unet_dir} has no {WEIGHTS_NAME} (found: {found or 'nothing'}); sharded, .bin and "
                         "variant-only UNets are not supported yet: re-save it with "
                         "`unet.save_pretrained(folder, max_shard_size='100GB')`")
    return MergeInput(path, weights, pipeline, unet_dir)


def read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, safetensors dtype) from a file's header, without reading a tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as handle:
            out = {}
            for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                piece = handle.get_slice(key)
                out[key] = (tuple(piece.get_shape()), piece.get_dtype())
            return out
    except (SafetensorError, OSError, RuntimeError) as err:
        raise MergeError(f"{file} is not a readable safetensors file (truncated or corrupt: {err}); "
                         "re-download or re-export it") from None


def check_compatible(inputs: list[MergeInput]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The first input's header, once every other input has exactly its keys and shapes; otherwise
    an error naming the first mismatched key (in the first input's order) and both shapes."""
    first = inputs[0]
    reference = read_header(first.weights)
    if not reference:
        raise MergeError(f"{first.weights} holds no tensors")
    for other in inputs[1:]:
        header = read_header(other.weights)
        for key, (shape, _) in reference.items():
            if key not in header:
                raise MergeError(f"{other.path} has no key {key!r} (present in {first.path}): the models are not "
                                 "the same architecture; merge only fine-tunes of one base")
            if header[key][0] != shape:
                raise MergeError(f"key {key!r} has shape {list(shape)} in {first.path} but "
                                 f"{list(header[key][0])} in {other.path}: the models are not the same "
                                 "architecture; merge only fine-tunes of one base")
        extra = [k for k in header if k not in reference]
        if extra:
            raise MergeError(f"{other.path} has {len(extra)} key(s) that {first.path} lacks, first {extra[0]!r}: "
                             "the models are not the same architecture; merge only fine-tunes of one base")
    return reference
