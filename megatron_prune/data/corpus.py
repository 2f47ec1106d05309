"""Real English text from a package registry: Jane Austen's six novels (public domain), shipped by
Debian's ``r-cran-janeaustenr`` as R data and read here without R.

Calibration and evaluation text are disjoint by book: *Persuasion* is held out for evaluation,
the other five novels are for calibration and training.

R's lazy-load database: ``Rdata.rdx`` (an RDS file) maps each object to an (offset, length)
in ``Rdata.rdb``; each entry there is a 4-byte big-endian length followed by a zlib stream
holding the serialized object (here a character vector, one element per line of the book).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

DEBIAN_PACKAGE = "r-cran-janeaustenr"
_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
EVAL_BOOKS = ("persuasion",)
CALIBRATION_BOOKS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "prideprejudice",
    "sensesensibility",
)


def cache_dir() -> Path:
    """Where fetched models and text are kept (``MEGATRON_PRUNE_CACHE``, else ~/.cache)."""
    root = os.environ.get("MEGATRON_PRUNE_CACHE") or Path.home() / ".cache" / "megatron_prune"
    return Path(root)


def _download_deb(workdir: Path) -> Path:
    def download() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["apt-get", "download", DEBIAN_PACKAGE], cwd=workdir, capture_output=True, text=True
        )

    result = download()
    if result.returncode != 0:  # a fresh machine may have empty package lists
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        result = download()
    debs = list(workdir.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download {DEBIAN_PACKAGE} failed: {result.stderr.strip()}")
    return debs[0]


def _read_lazyload(data_dir: Path) -> dict[str, str]:
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS"
        index = rdata.conversion.convert(
            rdata.parser.parse_data((data_dir / "Rdata.rdx").read_bytes())
        )
        blob = (data_dir / "Rdata.rdb").read_bytes()
        books = {}
        for name, (offset, length) in index["variables"].items():
            entry = blob[int(offset) : int(offset) + int(length)]
            (size,) = struct.unpack(">I", entry[:4])
            raw = zlib.decompress(entry[4:])
            if len(raw) != size:
                raise RuntimeError(f"{name}: corrupt lazy-load entry")
            lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
            books[str(name)] = "\n".join(str(line) for line in lines) + "\n"
    return books


def austen_books(directory: Path | None = None) -> dict[str, Path]:
    """Fetch (once) and return ``{book: path to its .txt}``."""
    out = Path(directory) if directory else cache_dir() / "austen"
    wanted = {b: out / f"{b}.txt" for b in (*CALIBRATION_BOOKS, *EVAL_BOOKS)}
    if all(p.is_file() for p in wanted.values()):
        return wanted
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        deb = _download_deb(Path(tmp))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        books = _read_lazyload(Path(tmp) / "x" / _DATA_DIR)
    for name, path in wanted.items():
        partial = path.with_suffix(".txt.partial")
        partial.write_text(books[name], encoding="utf-8")
        os.replace(partial, path)
    return wanted


def write_splits(directory: Path) -> tuple[Path, Path]:
    """``calibration.txt`` (five novels) and ``eval.txt`` (Persuasion) in ``directory``."""
    books = austen_books()
    directory.mkdir(parents=True, exist_ok=True)
    splits = {"calibration.txt": CALIBRATION_BOOKS, "eval.txt": EVAL_BOOKS}
    for filename, names in splits.items():
        partial = directory / (filename + ".partial")
        with partial.open("w", encoding="utf-8") as f:
            for name in names:
                shutil.copyfileobj(books[name].open(encoding="utf-8"), f)
        os.replace(partial, directory / filename)
    return directory / "calibration.txt", directory / "eval.txt"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else cache_dir() / "text"
    for p in write_splits(target):
        print(p)
