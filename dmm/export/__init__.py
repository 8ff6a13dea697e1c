"""Exports of a baked merged model for other tools: an original-layout single file (A1111,
ComfyUI) and a style LoRA. The diffusers-folder export lives in `dmm.pipeline`, which calls these."""
