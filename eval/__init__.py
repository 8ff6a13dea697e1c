"""Evaluation of DMM merged models: FID matrix, scores and the report (``python -m eval.suite``).

Modules (one idea each):
  eval.fid       float64 feature statistics, exact FID matrix, FIDt
  eval.features  FID feature extractors behind a registry (FID Inception-v3, toy world, any module)
  eval.scores    CLIP score, LAION aesthetic v2, PickScore (HF CLIP folders; open_clip optional)
  eval.generate  sampling with an on-disk, resumable image/feature cache
  eval.report    report.json, report.md, heatmaps and image grids
  eval.suite     the command line that runs all of it
"""
