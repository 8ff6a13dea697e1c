"""Evaluation of DMM merged models: FID matrix, scores and the report (``python -m eval.suite``).

The flow is one way: plan -> generate -> FID and metrics -> report. Modules (one idea each):
  eval.plan       settings, checks and the image sets, decided before any sampling
  eval.generate   sampling (dmm.sampling, one seed per image) with an on-disk, resumable cache
  eval.features   FID feature extractors on a registry (toy world, any module, plugins)
  eval.inception  the FID Inception-v3 in plain torch (the ``inception`` extractor)
  eval.fid        float64 feature statistics, exact FID matrix, FIDt
  eval.scores     CLIP score, LAION aesthetic v2, PickScore (HF CLIP folders; open_clip optional)
  eval.metrics    the metric registry (the scores above and any plugin's), run per image set
  eval.report     report.json, report.md, heatmaps and image grids
  eval.suite      runs the steps in order; eval.cli is its command line
  eval.demo       the ``make demo`` summary, from the same steps
"""
