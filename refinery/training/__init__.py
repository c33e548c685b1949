"""The training stage: SFT export → mlx-lm data → LoRA adapter → evaluation → promotion.

Only the modules that train or evaluate import mlx; `collect` and `config` do not, so the
data side can run (and be tested) without the training stack.
"""
