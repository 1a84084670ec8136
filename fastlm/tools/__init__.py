"""Developer tools run as ``python -m fastlm.tools.<name>``."""
