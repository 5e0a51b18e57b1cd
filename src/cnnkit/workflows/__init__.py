"""The user-facing verbs of each task (train, val, predict); the CLI calls exactly these."""
