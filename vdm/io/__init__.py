"""Files on disk: training checkpoints, exported model bundles, video files."""
