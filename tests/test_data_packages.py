"""Package sources (`debian:`, `pypi:`): the HTML and POD converters, the paragraph filter and deduplication, the
include globs, and a whole fetch of a .deb built here with `dpkg-deb --build` (no network; one test downloads)."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from steps.artifacts import StageError, read_manifest
from steps.data.fetch import fetch
from steps.data.packages import debian_licence, html_paragraphs, package_records, pod_paragraphs, select_files

REPO = Path(__file__).resolve().parents[1]
needs_dpkg = pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="dpkg-deb is not installed")

PROSE = "This paragraph is long enough to be kept, and it is made of words rather than numbers."

HTML = """<!DOCTYPE html><html><head><title>Page title</title><style>p { color: red }</style></head><body>
<nav><a href="index.html">Home</a> &gt; <a href="next.html">Next chapter</a></nav>
<header>The site header</header>
<h1>Title &amp; more¶</h1>
<p>First   paragraph with
   <code>inline</code> code &mdash; it keeps &lt;tags&gt; as text.</p>
<pre>for x in range(10):
    print(x)</pre>
<ul><li>item one</li><li>item two<br>after a break</li></ul>
<script>var html = "<p>not text</p>";</script>
<table><tr><td>cell a</td><td>cell b</td></tr></table>
<footer>Copyright 2024</footer></body></html>"""

POD = """#!/usr/bin/perl
print "code before the POD is not text\\n";

=encoding utf8

=head1 NAME

perlfoo - B<bold> and I<italic>

=head2 A C<< $obj->method >> heading

A paragraph with C<code>, L<the docs|perlfunc/open>, L<perlvar/"$_">, F<file.txt>,
E<lt>lt E<gt>gt, X<index entry>S<no break> and B<I<nested>> codes.

    my $verbatim = "code";
    print $verbatim;

=over 4

=item * A bullet

=item B<-x>

Item body: caf\\x{e9} is E<eacute>t E<0x41> E<65>.

=back

=begin html

<p>for HTML formatters only</p>

=end html

=for comment invisible

=cut

print "code after the POD\\n";
"""


def test_html_keeps_prose_and_drops_navigation_code_and_page_furniture():
    assert html_paragraphs(HTML) == [
        "Title & more", "First paragraph with inline code — it keeps <tags> as text.",
        "item one", "item two", "after a break", "cell a", "cell b",
    ]


def test_pod_keeps_text_and_reduces_formatting_codes():
    assert pod_paragraphs(POD) == [
        "NAME", "perlfoo - bold and italic", "A $obj->method heading",
        'A paragraph with code, the docs, "$_" in perlvar, file.txt, <lt >gt, no break and nested codes.',
        "A bullet", "-x", "Item body: caf\\x{e9} is ét A A.",
    ]


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def test_short_and_numeric_paragraphs_are_dropped_and_repeats_kept_once_across_files(tmp_path):
    footer = "Copyright the authors; this footer repeats on every single page of the documentation."
    root = write(tmp_path, {
        "doc/a.txt": f"{PROSE}\n\nShort one.\n\n{footer}\n\n1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20\n",
        "doc/b.html": f"<p>Another paragraph, this one only in the second file of the package.</p><p>{footer}</p>",
        "doc/c.pod.gz": gzip.compress(f"=head1 DESCRIPTION\n\n{footer}\n\n{PROSE}\n".encode()),
    })
    stats = {"paragraphs": 0, "characters": 0, "duplicates": 0, "filtered": 0}
    files = select_files(root, ["doc/*"], [], "test", set())
    records = package_records(root, files, "pkg", set(), stats)
    assert [r["text"] for r in records] == [
        f"{PROSE}\n\n{footer}", "Another paragraph, this one only in the second file of the package."]
    assert {r["source"] for r in records} == {"pkg"}
    assert stats["duplicates"] == 3 and stats["filtered"] == 3  # footer twice, PROSE once; short, numbers, heading


def test_globs_stay_in_a_folder_unless_double_star_and_exclude_wins(tmp_path):
    root = write(tmp_path, {"d/a.html": "", "d/sub/b.html": "", "d/sub/deep/c.html": "", "d/_static/x.html": ""})
    used = set()
    assert select_files(root, ["d/*.html"], [], "t", used) == ["d/a.html"]
    assert select_files(root, ["d/**/*.html"], ["**/_static/**"], "t", used) == [
        "d/a.html", "d/sub/b.html", "d/sub/deep/c.html"]
    assert used == {"d/*.html", "d/**/*.html"}


def test_unknown_suffix_names_the_file(tmp_path):
    root = write(tmp_path, {"doc/manual.pdf": "%PDF"})
    with pytest.raises(StageError, match=r"doc/manual\.pdf .*supported"):
        select_files(root, ["doc/*"], [], "debian package x 1.0", set())


# ---------------------------------------------------------------- a whole fetch of a .deb built here


COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tinydoc

Files: *
Copyright: 2024 Someone
License: GPL-2+ or CC-BY-SA-3.0

Files: debian/*
License: GPL-2+

License: GPL-2+
 The GPL text.
"""


def build_deb(tmp_path: Path, name: str = "tinydoc", version: str = "1.2-3") -> Path:
    tree = write(tmp_path / "tree", {
        "DEBIAN/control": f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: T <t@example.org>\n"
                          "Description: test documentation\n",
        f"usr/share/doc/{name}/copyright": COPYRIGHT,
        f"usr/share/doc/{name}/html/index.html": f"<nav>Contents</nav><p>{PROSE}</p><pre>code()</pre>",
        f"usr/share/doc/{name}/html/guide.html": "<p>The guide explains everything in plain English sentences.</p>"
                                                 f"<p>{PROSE}</p>",
        f"usr/share/doc/{name}/manual.pdf": "%PDF-1.4",
        f"usr/share/{name}/pod/intro.pod": "=head1 NAME\n\nA manual page written in POD, with B<bold> words in it.\n",
    })
    deb = tmp_path / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True, capture_output=True)
    return deb


@needs_dpkg
def test_fetch_a_local_deb_records_text_source_and_provenance(tmp_path):
    deb, out = build_deb(tmp_path), tmp_path / "raw"
    fetch({"debian": [str(deb)], "include": ["usr/share/doc/tinydoc/html/*.html", "usr/share/tinydoc/**/*.pod"]},
          str(out))
    data = datasets.load_from_disk(str(out))
    assert data.column_names == ["text", "source", "file"]
    assert data["text"] == ["The guide explains everything in plain English sentences.\n\n" + PROSE,
                            "A manual page written in POD, with bold words in it."]
    assert set(data["source"]) == {"tinydoc"}
    assert data["file"][0].startswith("usr/share/doc/tinydoc/html/") and data["file"][1].endswith(".pod")
    (package,) = read_manifest(out)["packages"]
    assert package["name"] == "tinydoc" and package["version"] == "1.2-3" and package["files"] == 3
    assert package["licence"] == ["GPL-2+", "GPL-2+ or CC-BY-SA-3.0"]
    assert package["duplicates"] == 1 and package["characters"] == sum(map(len, [
        PROSE, "The guide explains everything in plain English sentences.", data["text"][1]]))
    assert package["sha256"] == hashlib.sha256(deb.read_bytes()).hexdigest()
    assert not (out / ".scratch").exists()


@needs_dpkg
def test_include_glob_matching_nothing_names_the_glob_and_package(tmp_path):
    deb, out = build_deb(tmp_path), tmp_path / "raw"
    with pytest.raises(StageError, match=r"'usr/share/doc/tinydoc/old/\*\.html' matches no file in tinydoc 1\.2-3"):
        fetch({"debian": [str(deb)], "include": ["usr/share/doc/tinydoc/html/*.html",
                                                 "usr/share/doc/tinydoc/old/*.html"]}, str(out))
    assert not out.exists()


@needs_dpkg
def test_unknown_suffix_in_a_package_stops_the_fetch(tmp_path):
    deb, out = build_deb(tmp_path), tmp_path / "raw"
    with pytest.raises(StageError, match=r"tinydoc 1\.2-3: cannot read usr/share/doc/tinydoc/manual\.pdf as text"):
        fetch({"debian": [str(deb)], "include": ["usr/share/doc/tinydoc/**"]}, str(out))
    assert not out.exists()


def test_missing_local_deb_and_missing_include_are_one_line_errors(tmp_path):
    with pytest.raises(StageError, match="does not exist"):
        fetch({"debian": [str(tmp_path / "nope.deb")], "include": ["*"]}, str(tmp_path / "raw"))
    with pytest.raises(StageError, match="needs `include:`"):
        fetch({"debian": ["perl-doc"]}, str(tmp_path / "raw"))


def test_licence_of_a_copyright_without_dep5_or_in_a_linked_doc_folder(tmp_path):
    write(tmp_path, {"usr/share/doc/old/copyright": "\n\nThis package was debianized by someone.\n\nGPL\n",
                     "usr/share/doc/tool-common/copyright": COPYRIGHT})
    (tmp_path / "usr/share/doc/tool-doc").symlink_to("tool-common")
    assert debian_licence(tmp_path, "usr/share/doc/old/copyright") == "This package was debianized by someone."
    assert debian_licence(tmp_path, "usr/share/doc/tool-doc/copyright").startswith("in tool-common's copyright")
    assert debian_licence(tmp_path, "usr/share/doc/none/copyright") is None


needs_apt = pytest.mark.skipif(not shutil.which("apt-get") or not shutil.which("dpkg-deb"), reason="needs apt and dpkg")


@needs_apt
def test_unknown_debian_package_is_one_line_naming_it_and_the_fix(tmp_path):
    """apt answers from its local package lists: no network."""
    out = tmp_path / "raw"
    result = subprocess.run([sys.executable, "-m", "steps.data.fetch", "--spec", json.dumps(
        {"debian": ["no-such-package-xyz"], "include": ["*"]}), "--out", str(out)], cwd=REPO, capture_output=True,
        text=True, timeout=120)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "no-such-package-xyz" in last and "apt-get update" in last and "apt-cache policy" in last, last
    assert not out.exists()


# ---------------------------------------------------------------- the one test that downloads


@needs_apt
def test_apt_get_download_of_a_tiny_package(tmp_path):
    out = tmp_path / "raw"
    try:
        fetch({"debian": ["fortunes-min"], "include": ["usr/share/games/fortunes/literature"]}, str(out))
    except StageError as err:
        if "Unable to locate" in str(err) or "Failed to fetch" in str(err) or "Temporary failure" in str(err):
            pytest.skip(f"no package lists or no network: {err}")
        raise
    (package,) = read_manifest(out)["packages"]
    assert package["name"] == "fortunes-min" and package["version"] and package["archive"].endswith(".deb")
    assert len(datasets.load_from_disk(str(out))) > 0
