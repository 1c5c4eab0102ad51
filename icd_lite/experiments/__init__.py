"""The experiment harness: what the notebooks and ``python -m icd_lite.bench`` measure with.

The concept files of ``icd_lite`` (schedule, solver, guidance, consistency, losses, pipeline,
attention, editing) are the method; this subpackage is the lab bench around it. Read it after
the method, when you want to know how a figure's numbers were made:

* ``paper``              - the paper's numbers (Tables 1, 2, 4, 5, 6; Figs. 4a, 9, 12), cited
* ``claims``             - a claim of the paper, the rule that tests it on the toy, the verdict
* ``world_quality``      - the toy world against its bars: VAE, CLIP, the teacher (notebook 02)
* ``evaluation``         - the inversion experiments: Tables 1, 2, 5, 6 and Fig. 4a (notebook 04)
* ``toybench``           - ToyBench: PIE-Bench-style edit cases with exact targets, and metrics
* ``editing_evaluation`` - every editor on ToyBench, edit timing, the trade-off sweep (notebook 05)
* ``ablations``          - dynamic-guidance and attention-control sweeps (notebook 06)
* ``report``             - ``make report``: docs/results.md from the figures' CSVs
* ``pie_bench``, ``pie_run``, ``sd15_tables`` - PIE-Bench, and the paper's tables at SD1.5 scale
  (``python -m icd_lite.bench pie | table2 | table4``; see docs/sd15.md)
"""
