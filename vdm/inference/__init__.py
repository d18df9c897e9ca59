"""Text -> video with a trained model: sampling settings, the pipeline, writing files."""
