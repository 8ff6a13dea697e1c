"""Caption conditioning computed by the pipeline itself, cached for the closed caption set.

Training must see exactly what sampling feeds the UNet, so embeddings come from the pipeline's own
`encode_prompt` through `dmm.conditioning.encode_prompts` (and `size_ids` for a 32x32 image), never
from a re-implementation.
The last row of the table is the empty caption: the unconditional branch for CFG and the 10%
caption dropout of training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dmm.conditioning import encode_prompts, size_ids


@dataclass
class CaptionTable:
    """Per-caption UNet inputs; row `len(captions)` is the empty caption."""

    captions: list[str]
    prompt_embeds: torch.Tensor  # [C+1, L, D]
    pooled: torch.Tensor | None  # [C+1, P] (SDXL) or None
    time_ids: torch.Tensor | None  # [6] (SDXL) or None

    @property
    def empty_index(self) -> int:
        return len(self.captions)

    def index(self, caption: str) -> int:
        return self._lookup()[caption]

    def _lookup(self) -> dict[str, int]:
        if not hasattr(self, "_map"):
            self._map = {c: i for i, c in enumerate(self.captions)}
        return self._map

    def unet_inputs(self, rows: torch.Tensor) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward` for caption rows `rows`."""
        kw = {"encoder_hidden_states": self.prompt_embeds[rows]}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled[rows],
                                       "time_ids": self.time_ids.expand(len(rows), -1)}
        return kw

    def state_dict(self) -> dict:
        d = {"prompt_embeds": self.prompt_embeds}
        if self.pooled is not None:
            d.update(pooled=self.pooled, time_ids=self.time_ids)
        return d


@torch.no_grad()
def encode_captions(pipe, captions: list[str], resolution: int = 32, batch: int = 256) -> CaptionTable:
    """Encode `captions` + the empty caption with the one caption encoder (`dmm.conditioning`)."""
    texts = list(captions) + [""]
    embeds, pooled = [], []
    for i in range(0, len(texts), batch):
        pe, pp = encode_prompts(pipe, texts[i:i + batch], "cpu")
        embeds.append(pe)
        pooled.append(pp)
    sdxl = pooled[0] is not None
    return CaptionTable(captions=list(captions), prompt_embeds=torch.cat(embeds).float(),
                        pooled=torch.cat(pooled).float() if sdxl else None,
                        time_ids=size_ids(pipe, resolution)[0] if sdxl else None)
