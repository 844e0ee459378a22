"""``python -m diffusers_tread.hub [DIR]``: write the remote-code bundle to look at (default: pipelines/tread_dit/)."""

import sys
from pathlib import Path

from .bundle import REPO_ROOT, bundle_files

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else REPO_ROOT / "pipelines" / "tread_dit")
    for relative, text in bundle_files().items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_text(text, encoding="utf-8")
        print(out / relative)
