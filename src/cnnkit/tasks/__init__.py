"""Tasks: what makes classification, detection, segmentation... a task (loss, postprocess, metrics)."""
