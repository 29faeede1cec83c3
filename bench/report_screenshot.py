"""Look at `snakemake --report` output the way a user does: headless Chromium screenshots of a result view.

    snakemake --report report.html && python -m bench.report_screenshot report.html --open Chains pages --out shot.png

The report is a single-page app without addressable views, so a copy of it gets a small script that clicks
through the menu entries named by `--open` and then the first result's eye icon; Chromium (Debian package
`chromium`) renders that copy headless and writes the screenshot. Writes nothing into the report itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CLICKS = """
<script>
(function () {
  const steps = %s;
  function byText(text) {
    const hits = [...document.querySelectorAll("a,button,li,span,div,td")]
      .filter((el) => el.childElementCount <= 2 && el.textContent.trim() === text);
    return hits[hits.length - 1];
  }
  steps.forEach((text, i) => setTimeout(() => { const el = byText(text); if (el) el.click(); }, 600 * (i + 1)));
  setTimeout(() => { const eye = document.querySelector('a[iconname="eye"]'); if (eye) eye.click(); }, 600 * (steps.length + 1));
})();
</script>
"""


def screenshot(report: Path, clicks: list[str], out: Path, size: str = "1400,1000", chromium: str = "chromium") -> None:
    if shutil.which(chromium) is None:
        sys.exit(f"report_screenshot: {chromium} not found; install it (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(report.read_text() + CLICKS % json.dumps(clicks))  # after </html>: still run
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={size}",
             f"--virtual-time-budget={1000 + 600 * (len(clicks) + 2)}", f"--screenshot={out.resolve()}", page.as_uri()],
            check=True, capture_output=True, timeout=120,
        )
    print(f"wrote {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--open", nargs="*", default=[], metavar="ENTRY", help="menu entries to click, in order")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", default="1400,1000", help="window width,height in pixels")
    args = parser.parse_args(argv)
    screenshot(args.report, args.open, args.out, args.size)


if __name__ == "__main__":
    main()
