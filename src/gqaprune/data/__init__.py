"""Data: sources (local folder, Hub, files), corpora, instruction records, calibration windows,
tokenised fine-tuning examples and their collators."""
