"""A run on disk: metrics and summary, the checkpoint and the run state it holds, adapter exports."""
