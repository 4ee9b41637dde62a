"""Background jobs: each writes a progress file beside its output (progress.py), stops cleanly on a
signal (stop.py), and is started, listed, resumed and dismissed by launcher.py."""
