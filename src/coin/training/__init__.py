"""Contrastive fine-tuning: the loop, its checkpoints and distributed set-up. Nothing here needs pydantic or the
orchestration stack (a GPU machine runs it without them: bench/gpu_check.py)."""

# train.* settings that cannot change what a training computes: a resumed run may change them (coin.training.
# checkpoint), and a method's kept training is kept whatever they are (the train stage's key, coin.stage_specs).
# Gradient checkpointing recomputes the very same activations (dropout too: torch restores the RNG state), so it
# can be turned on to resume after running out of memory; and whether to resume must never decide whether one can.
# Here, not in coin.config: the training loop imports it on machines without pydantic
TRAIN_RESULT_FREE_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing", "resume")
