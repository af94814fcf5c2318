"""Pretrained checkpoints loaded into `attnkit.nn` parts (`attnkit.models.bert`)."""
