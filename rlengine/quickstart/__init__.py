"""``rlengine quickstart``: the whole RLHF pipeline on the built-in synthetic task, with a
report (report.md, plots, metrics.jsonl) and the trained models. See pipeline.py for how
stages are reused, skipped and re-run, stages.py for what each does, report.py for the
report."""
