"""Files in and out, shared by the trainer and the service: video read (`formats.video`), resized
and restored (`formats.geometry`), written whole (`formats.video_write`) or clip by clip
(`formats.video_stream`), and token files (`formats.tokens`). No HTTP here: errors say what is
wrong with a file, and the service decides which status that is (service/errors.py)."""
