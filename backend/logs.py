"""One log format for the web app, the workers and the command line.

LOG_FORMAT=text (default) prints one line per record; LOG_FORMAT=json prints one JSON object
per line with the project and job ids as fields, for log shippers. Messages carry ids, never
secrets or task texts; third-party loggers that would print URLs or payloads stay at WARNING.
"""

import json
import logging
import os
import re
import sys

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
_IDS = re.compile(r"\b(project|job)=([\w.-]+)")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": message,
        }
        entry.update(dict(_IDS.findall(message)))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_atl", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        as_json = os.environ.get("LOG_FORMAT", "text").lower() == "json"
        handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(FORMAT))
        handler._atl = True
        root.addHandler(handler)
    root.setLevel(level)
    # Third-party request logs at INFO would print URLs with tokens and task texts.
    for noisy in ("httpx", "httpcore", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
