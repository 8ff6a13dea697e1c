"""Caption conditioning computed by the pipeline itself, cached for the closed caption set.

Training must see exactly what sampling feeds the UNet, so embeddings come from the pipeline's own
`encode_prompt` (and SDXL's `_get_add_time_ids` for a 32x32 image), never from a re-implementation.
The last row of the table is the empty caption: the unconditional branch for CFG and the 10%
caption dropout of training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
    """Encode `captions` + the empty caption with `pipe.encode_prompt` (SDXL or SD1.5 pipeline)."""
    texts = list(captions) + [""]
    sdxl = hasattr(pipe, "text_encoder_2")
    embeds, pooled = [], []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        if sdxl:
            pe, _, pp, _ = pipe.encode_prompt(chunk, device=torch.device("cpu"), num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
            pooled.append(pp)
        else:
            pe, _ = pipe.encode_prompt(chunk, torch.device("cpu"), 1, False)
        embeds.append(pe)
    time_ids = None
    if sdxl:
        size = (resolution, resolution)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)[0]
    return CaptionTable(captions=list(captions), prompt_embeds=torch.cat(embeds).float(),
                        pooled=torch.cat(pooled).float() if sdxl else None, time_ids=time_ids)
