"""GRPO: `core` holds the maths as pure tensor functions, `reference` the π_ref policy, `loop` the trainer."""
