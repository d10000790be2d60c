"""Epoch times read back from a step's log.txt: the `epoch i/n: ... (Ts, lr ...)` lines the trainer writes."""
import re
from pathlib import Path

EPOCH_SECONDS = re.compile(r"\] epoch \d+/\d+: .*\(([\d.]+)s, lr")


def epoch_seconds(log_txt: Path) -> list[float]:
    """Times of the epochs a step's log.txt reports (data loading + training, no evaluation); [] without it."""
    return [float(m.group(1)) for m in EPOCH_SECONDS.finditer(log_txt.read_text())] if log_txt.is_file() else []
