"""Fine-tuning a pretrained M3AE (or MAE) encoder as a classifier: a trainer task
(`config.task = "m3ae.finetune"`, `configs/m3ae_finetune.py`, `m3ae finetune`)."""
