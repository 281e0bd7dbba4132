"""The DeepSpeed training engine's pieces; `eqv2/train.py` wires them together top to bottom.

dist (launcher discovery), config (run + ds_config), optim (AdamW groups, cosine schedule), loss
(global-count normalisation), metrics (exact S2EF metrics), ema, activation_checkpointing,
checkpointing (crash-safe, universal resume), signals (exit codes), monitor (logging).
"""
