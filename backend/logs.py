"""One log format for the web app, the workers and the command line."""

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_atl", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._atl = True
        root.addHandler(handler)
    root.setLevel(level)
    # Third-party request logs at INFO would print URLs with tokens and task texts.
    for noisy in ("httpx", "httpcore", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
