"""kubetune's trainer: a FineTuneJob's training run under Ray Train + DeepSpeed ZeRO.

`python -m kubetune_trainer --config FILE|URI` runs one job; `kubetune run`
calls `kubetune_trainer.local.main` (an entry point of `kubetune.commands`).
Importing this package is cheap: torch, ray and deepspeed are imported inside
the functions that need them.
"""
