"""`make demo`: the most complete end-to-end path that exists so far (extended by each issue)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import sample_media


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        result = sample_media.write_sample_set(Path(tmp))
        print(f"sample media: {len(result.videos)} videos, {len(result.images)} images")
    return subprocess.call([sys.executable, "-m", "keye_train.cli", "plugins"])


if __name__ == "__main__":
    raise SystemExit(main())
