"""Files in and out, shared by the trainer and the service: video (`formats.video`) and token
files (`formats.tokens`). No HTTP here: errors say what is wrong with a file, and the service
decides which status that is (service/errors.py)."""
