"""Build the corpus for the tiny embedded models: the World English Bible, one JSONL document per chapter.

Why this text: it is the largest clean English prose that installs from Debian on a machine without internet,
it is in the public domain, and its English is modern (2020 edition of a 1997-2020 translation), unlike the
King James Version. Do not add the KJV (`bible-kjv-text`, `sword-text-kjv`) next to it: a held-out WEB chapter
would then have its parallel KJV chapter in the training split.

Install the text (about 4 MB, no other dependency; `diatheke` is not needed):

    apt-get install -y --no-install-recommends sword-text-web

Licence (from /usr/share/doc/sword-text-web/copyright, `License: public-domain`, and the module's own
`DistributionLicense=Public Domain`): "The World English Bible is in the Public Domain. That means that it is
not copyrighted. However, 'World English Bible' is a Trademark of eBible.org. [...] All we ask is that if you
CHANGE the actual text of the World English Bible in any way, you not call the result the World English Bible
any more." This corpus drops the footnotes and headings, so call it "text from the World English Bible", not
"the World English Bible". Debian's packaging files are GPL-2+; no packaging file goes into the corpus.

The SWORD module (zText driver) is read directly rather than through `diatheke`: diatheke's plain output of a long
range repeats Psalm 151's heading before every later verse and leaves words glued where a footnote sat
("Godcreated"). Reading the OSIS markup here lets footnotes, cross-references and non-canonical headings go while
paragraph and poetry line breaks stay as newlines.

Documents are chapters (1,394 with the deuterocanon) plus the translators' preface and glossary, one JSON object
{"id": "Gen.1", "text": ...} per line, newlines inside the text marking paragraphs and poetry lines. The split is
by document, shuffled by the SHA-256 of "<seed>:<id>" (so it does not depend on Python's random module): the
first 2% go to valid, the next 2% to test, the rest to train, in that hashed order. Near-copies (the module's
Greek Daniel 1-6, Kings/Chronicles parallels) are kept in one split so held-out text has no copy in train.

    python examples/tiny/prepare_corpus.py --out data/tiny-corpus
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import re
import struct
import sys
import time
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MODULE = "engWEB2015eb"
SWORD_ROOT = Path("/usr/share/sword")
APT_COMMAND = "apt-get install -y --no-install-recommends sword-text-web"
LICENCE = "public domain (World English Bible; 'World English Bible' is a trademark of eBible.org)"

_TOKEN = re.compile(r"<[^>]*>|[^<]+")
_ATTR = re.compile(r'([A-Za-z]+)="([^"]*)"')
_SPACES = re.compile(r"[^\S\n]+")
_NOTE_GAP = re.compile(r"(?<=[^\s\x01-\x03“‘(\[—-])[\x01-\x03]*\x01[\x01-\x03]*(?=[A-Za-z0-9“‘(])")
# Tags whose start or end breaks a line (besides paragraph divs): poetry lines and groups, list items, speakers.
_LINE_BREAK_TAGS = {"lb", "l", "lg", "item", "list", "speaker"}
# Containers whose text is never corpus text.
_DROPPED = {"note"}


@dataclass(frozen=True)
class Document:
    """One unit of the split: a chapter, or the preface or glossary."""

    id: str
    text: str


def read_ztext(folder: Path) -> Iterator[str]:
    """Yield every entry of a SWORD zText module in versification order (Old Testament, then New).

    The format: `<t>.bzv` has one 10-byte record per key (block number, offset, size), `<t>.bzs` one 12-byte
    record per block (offset, compressed size, uncompressed size), and `<t>.bzz` the zlib-compressed blocks.
    """
    for testament in ("ot", "nt"):
        index = (folder / f"{testament}.bzv").read_bytes()
        blocks = (folder / f"{testament}.bzs").read_bytes()
        data = (folder / f"{testament}.bzz").read_bytes()
        cache: dict[int, bytes] = {}
        for start in range(0, len(index), 10):
            block, offset, size = struct.unpack_from("<IIH", index, start)
            if size == 0:
                continue
            if block not in cache:
                cache.clear()  # entries come block by block, so one decompressed block is enough
                where, length, _ = struct.unpack_from("<III", blocks, 12 * block)
                cache[block] = zlib.decompress(data[where : where + length])
            yield cache[block][offset : offset + size].decode("utf-8")


def module_folder(sword_root: Path, module: str = MODULE) -> Path:
    """The module's data folder, from the `DataPath=` line of its `mods.d/*.conf`."""
    for conf in sorted((sword_root / "mods.d").glob("*.conf")):
        text = conf.read_text(encoding="utf-8", errors="replace")
        if re.search(rf"^\[{re.escape(module)}\]", text, re.M | re.I):
            data_path = re.search(r"^DataPath=(.+)$", text, re.M)
            if data_path:
                return (sword_root / data_path.group(1).strip()).resolve()
    return sword_root / "modules" / "texts" / "ztext" / module


def _tag(token: str) -> tuple[str, bool, bool, dict[str, str]]:
    """Name, whether it closes (`</x>`), whether it is empty (`<x/>`), and attributes of one markup token."""
    closing = token.startswith("</")
    empty = token.endswith("/>")
    name = re.match(r"</?([A-Za-z]+)", token)
    return (name.group(1) if name else "", closing, empty, dict(_ATTR.findall(token)))


def _clean(raw: str) -> str:
    """Plain text from collected pieces: words split by removed markup rejoined, whitespace normalised."""
    # \x01 marks a removed footnote, \x02 a word end and \x03 a word start. The source often lacks the space
    # around a footnote ("God<note/>created", "Christ,<note/>the son"), so one goes back where text resumes
    # right after it; back-to-back words with only markup between them are split the same way.
    raw = _NOTE_GAP.sub(" ", raw)
    raw = raw.replace("\x02\x03", " ")
    raw = raw.translate({1: None, 2: None, 3: None})
    raw = unicodedata.normalize("NFC", html.unescape(raw))
    lines = (_SPACES.sub(" ", line).strip() for line in raw.split("\n"))
    return "\n".join(line for line in lines if line)


def extract_documents(entries: Iterator[str]) -> list[Document]:
    """Walk the OSIS stream and cut it into chapters, plus the front matter and the glossary.

    Kept: the text of every chapter, canonical psalm titles, and in the preface and glossary their section
    titles. Dropped: footnotes, non-canonical headings, book titles and the short deuterocanon introductions.
    """
    documents: list[Document] = []
    current: str | None = None  # id of the document being collected
    in_chapter = False  # whether that document is a chapter (else the preface or glossary)
    closer: str | None = None  # the eID that ends it
    pieces: list[str] = []
    skip = 0  # depth inside dropped markup (footnotes, headings)
    skip_stack: list[bool] = []  # per open <title>: whether it was dropped

    def finish() -> None:
        nonlocal current, closer, in_chapter
        if current is not None:
            text = _clean("".join(pieces))
            if text:
                documents.append(Document(current, text))
        current, closer, in_chapter = None, None, False
        pieces.clear()

    for entry in entries:
        for token in _TOKEN.findall(entry + " "):
            if not token.startswith("<"):
                if current is not None and skip == 0:
                    pieces.append(token)
                continue
            name, closing, empty, attrs = _tag(token)
            if name in _DROPPED:
                if not empty:
                    skip += -1 if closing else 1
                    if skip == 0 and current is not None:
                        pieces.append("\x01")
                continue
            if name == "title":
                if closing:
                    if skip_stack and skip_stack.pop():
                        skip -= 1
                    elif current is not None and skip == 0:
                        pieces.append("\n")
                elif not empty:
                    # In a chapter only the canonical psalm titles are text; the preface and glossary keep theirs.
                    dropped = current is None or (in_chapter and attrs.get("canonical") != "true")
                    skip_stack.append(dropped)
                    if dropped:
                        skip += 1
                    elif skip == 0:
                        pieces.append("\n")
                continue
            if skip:
                continue
            if name == "chapter":
                if "sID" in attrs:
                    finish()
                    current, closer, in_chapter = attrs.get("osisID", attrs["sID"]), attrs["sID"], True
                elif attrs.get("eID") == closer:
                    finish()
            elif name == "div":
                kind = attrs.get("type")
                if kind in ("front", "glossary") and "sID" in attrs and current is None:
                    current, closer = ("preface" if kind == "front" else "glossary"), attrs["sID"]
                elif kind in ("front", "glossary") and attrs.get("eID") == closer:
                    finish()
                elif kind == "x-p" and current is not None:
                    pieces.append("\n")
            elif name == "w" and current is not None:
                pieces.append("\x02" if closing else "\x03")
            elif name in _LINE_BREAK_TAGS and current is not None:
                pieces.append("\n")
    finish()
    return documents


def parallel_groups(documents: list[Document], threshold: float, width: int = 8) -> dict[str, str]:
    """Map each document id to the first id of its group of parallel chapters.

    Some chapters repeat others nearly word for word: the module's Greek Daniel 1-6 repeats Daniel 1-6, and
    Kings, Chronicles, Isaiah and Jeremiah share long passages. Two documents are parallel when at least
    `threshold` of the smaller one's `width`-word shingles occur in the other; parallels share a split, so no
    held-out chapter has a copy in train.
    """
    owners: dict[tuple[str, ...], list[int]] = {}
    sizes = []
    for index, document in enumerate(documents):
        words = re.findall(r"\w+", document.text.lower())
        shingles = {tuple(words[i : i + width]) for i in range(len(words) - width + 1)}
        sizes.append(max(1, len(shingles)))
        for shingle in shingles:
            owners.setdefault(shingle, []).append(index)
    shared: dict[tuple[int, int], int] = {}
    for members in owners.values():
        if 1 < len(members) <= 5:  # a phrase in many chapters is a formula, not a parallel
            for i, a in enumerate(members):
                for b in members[i + 1 :]:
                    shared[a, b] = shared.get((a, b), 0) + 1
    parent = list(range(len(documents)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (a, b), count in sorted(shared.items()):
        if count >= threshold * min(sizes[a], sizes[b]):
            ra, rb = root(a), root(b)
            parent[max(ra, rb)] = min(ra, rb)
    return {document.id: documents[root(i)].id for i, document in enumerate(documents)}


def split_documents(
    documents: list[Document], group_of: dict[str, str], seed: int, valid_fraction: float, test_fraction: float
) -> dict[str, list[Document]]:
    """Split whole groups of parallel documents, in an order fixed by SHA-256 rather than Python's random module."""
    groups: dict[str, list[Document]] = {}
    for document in documents:
        groups.setdefault(group_of[document.id], []).append(document)
    ranked = sorted(groups, key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).hexdigest())
    targets = {"valid": round(valid_fraction * len(documents)), "test": round(test_fraction * len(documents))}
    splits: dict[str, list[Document]] = {"train": [], "valid": [], "test": []}
    for key in ranked:
        name = next((n for n in ("valid", "test") if len(splits[n]) < targets[n]), "train")
        splits[name].extend(groups[key])
    return splits


def _stats(documents: list[Document]) -> dict[str, int]:
    return {
        "documents": len(documents),
        "characters": sum(len(d.text) for d in documents),
        "words": sum(len(d.text.split()) for d in documents),
        "bytes": sum(len(d.text.encode()) for d in documents),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/tiny-corpus"), help="output folder")
    parser.add_argument("--sword-root", type=Path, default=SWORD_ROOT, help="SWORD library (holds modules/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document split")
    parser.add_argument("--valid-fraction", type=float, default=0.02)
    parser.add_argument("--test-fraction", type=float, default=0.02)
    parser.add_argument(
        "--parallel-threshold",
        type=float,
        default=0.3,
        help="share of 8-word shingles above which two chapters count as parallel and share a split",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    folder = module_folder(args.sword_root)
    if not (folder / "ot.bzz").exists():
        print(f"{folder} not found; install the text with:\n  {APT_COMMAND}", file=sys.stderr)
        return 1
    documents = extract_documents(read_ztext(folder))
    group_of = parallel_groups(documents, args.parallel_threshold)
    splits = split_documents(documents, group_of, args.seed, args.valid_fraction, args.test_fraction)
    group_sizes = Counter(group_of.values())

    args.out.mkdir(parents=True, exist_ok=True)
    split_stats: dict[str, dict[str, int | str]] = {}
    print(f"{'split':<6} {'docs':>6} {'chars':>10} {'words':>9}  sha256")
    for name, docs in splits.items():
        body = "".join(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n" for d in docs)
        (args.out / f"{name}.jsonl").write_text(body, encoding="utf-8")
        stats = split_stats[name] = _stats(docs) | {"sha256": hashlib.sha256(body.encode()).hexdigest()}
        print(f"{name:<6} {stats['documents']:>6} {stats['characters']:>10} {stats['words']:>9}  {stats['sha256']}")
    total = _stats(documents)
    print(f"{'total':<6} {total['documents']:>6} {total['characters']:>10} {total['words']:>9}")
    parallel = sum(size for size in group_sizes.values() if size > 1)
    print(f"{parallel} documents in {sum(size > 1 for size in group_sizes.values())} groups of parallels kept together")
    meta = {
        "source": f"SWORD module {MODULE} (Debian package sword-text-web)",
        "licence": LICENCE,
        "install": APT_COMMAND,
        "seed": args.seed,
        "parallel_threshold": args.parallel_threshold,
        "splits": split_stats,
        "total": total,
    }
    # A README rather than a .json: did's data loader reads every .json/.jsonl file of a folder it is given.
    readme = (
        "# Text from the World English Bible\n\n"
        f"Made by examples/tiny/prepare_corpus.py from the Debian package sword-text-web ({APT_COMMAND}).\n"
        "Footnotes and headings are removed, so this is not 'the World English Bible' itself.\n"
        f"Licence: {LICENCE}.\n\n```json\n{json.dumps(meta, indent=2)}\n```\n"
    )
    (args.out / "README.md").write_text(readme, encoding="utf-8")
    print(f"wrote {args.out}/{{train,valid,test}}.jsonl and README.md in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
