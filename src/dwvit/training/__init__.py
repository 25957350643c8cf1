"""What `run_image_classification.py` is built from: arguments and argument files, data, augmentation, metrics,
the Trainer subclass with atomic checkpoints, callbacks, optimizer groups and redaction of secrets.

Import from the submodules (`dwvit.training.data`, `dwvit.training.augmentation`, ...); importing this package
loads none of them, so the model code never pulls in the training job's dependencies.
"""
