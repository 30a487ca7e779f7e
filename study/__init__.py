"""The study (study/run_study.py): regularizer families at several strengths against standard training."""
