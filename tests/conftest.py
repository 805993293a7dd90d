import os

# Nothing in the test suite may touch the hub: with this set, a stray hub id fails at once instead of
# hanging in retries for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
