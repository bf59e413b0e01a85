"""Build the shipped WordNet word lists (``backmix_vlm/data/wordlists/wordnet30.tsv.gz``) once.

Source: the Princeton WordNet 3.0 database files ``data.noun`` / ``data.adj`` (Debian package
``wordnet-base``: ``apt-get install wordnet-base`` puts them in ``/usr/share/wordnet``; the
same files are in Princeton's WordNet-3.0 tarball, ``dict/``).  WordNet 3.0's licence allows
copying and redistribution with its notice, which is shipped beside the list
(``WORDNET_LICENSE``).

One line per word: ``<lexicographer file>\\t<word>``, e.g. ``noun.artifact\\tsewing machine``.
Per synset, its first lemma (the NegLabel / CSP authors' lists hold one word per synset too),
lower-cased, ``_`` -> space, the adjective position markers ``(a)`` / ``(p)`` / ``(ip)``
dropped; each word once per lexicographer file, in database order.  The gzip stream is
written with mtime 0, so the file is byte-identical on every run.

    python scripts/prepare_wordnet.py [--dict /usr/share/wordnet]
"""
from __future__ import annotations

import argparse
import gzip
import io
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "backmix_vlm" / "data" / "wordlists"
# lexnames(5WN): the lexicographer file of each number in a synset's lex_filenum field
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl").split()
MARKER = re.compile(r"\((a|p|ip)\)$")
LICENSE = """WordNet Release 3.0

This software and database is being provided to you, the LICENSEE, by Princeton University under the
following license.  By obtaining, using and/or copying this software and database, you agree that you
have read, understood, and will comply with these terms and conditions.:

Permission to use, copy, modify and distribute this software and database and its documentation for any
purpose and without fee or royalty is hereby granted, provided that you agree to comply with the
following copyright notice and statements, including the disclaimer, and that the same appear on ALL
copies of the software, database and documentation, including modifications that you make for internal
use or for distribution.

WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR
WARRANTIES, EXPRESS OR IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON UNIVERSITY MAKES NO
REPRESENTATIONS OR WARRANTIES OF MERCHANT- ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE
OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS,
COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS.

The name of Princeton University or Princeton may not be used in advertising or publicity pertaining to
distribution of the software and/or database.  Title to copyright in this software, database and any
associated documentation shall at all times remain with Princeton University and LICENSEE agrees to
preserve same.

(The word lists in this folder are derived from the WordNet 3.0 database files data.noun and data.adj
by scripts/prepare_wordnet.py: the first lemma of each synset, grouped by lexicographer file.)
"""


def synset_words(path: Path) -> list[tuple[str, str]]:
    """``(lexname, first lemma)`` per synset of a ``data.<pos>`` file, in file order."""
    out = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if not line or line.startswith("  "):  # the licence header lines start with two spaces
            continue
        fields = line.split()
        lexname = LEXNAMES[int(fields[1])]
        word = MARKER.sub("", fields[4]).replace("_", " ").lower()
        out.append((lexname, word))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dict", type=Path, default=Path("/usr/share/wordnet"),
                    help="folder with WordNet 3.0's data.noun and data.adj (default: Debian wordnet-base's)")
    args = ap.parse_args()
    seen: set[tuple[str, str]] = set()
    lines = []
    for pos in ("noun", "adj"):
        src = args.dict / f"data.{pos}"
        if not src.is_file():
            raise SystemExit(f"{src} not found: apt-get install wordnet-base, or give --dict <WordNet-3.0>/dict")
        for lexname, word in synset_words(src):
            if (lexname, word) not in seen:
                seen.add((lexname, word))
                lines.append(f"{lexname}\t{word}\n")
    OUT.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write("".join(lines).encode("utf-8"))
    (OUT / "wordnet30.tsv.gz").write_bytes(buf.getvalue())
    (OUT / "WORDNET_LICENSE").write_text(LICENSE, encoding="utf-8")
    print(f"{len(lines)} words -> {OUT / 'wordnet30.tsv.gz'} ({len(buf.getvalue()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
