"""Replay of recordings, video files and image folders through the pipeline; re-scoring of retained frames."""
