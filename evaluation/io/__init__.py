"""Loading models for evaluation (checkpoints.py); outputs are written atomically through interp_train.io."""
