"""Verified, resumable slide downloads from the GDC data endpoint.

Each file is fetched by UUID from ``/data/<uuid>`` into ``<target>.part`` beside its target.
A transfer that breaks off resumes with an HTTP ``Range`` request from the bytes already
on disk (a server that ignores the range restarts the file). When the part file is complete
its md5 is checked against the manifest and only then is it renamed onto the target, so a
file with the final name is always a verified one. A part file with the wrong md5 is
removed and fetched again, up to ``verify_tries`` times, then the download fails with an
error and leaves no file that looks complete.

Rate limiting (429) and server errors (5xx) are retried by :class:`mambapath.gdc.GDCClient`,
which waits as long as the server's Retry-After asks. Files are fetched over at most
``max_connections`` parallel connections; Snakemake bounds the same thing across jobs with
the ``gdc_connections`` resource of the download rule.

Target names come from the manifest; where only a UUID is known the name comes from the
GDC's file metadata or the server's Content-Disposition header, and is reduced to a bare
file name first: a name with path components never writes outside the download folder.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import ConfigError, DataError
from .gdc import GDCClient, read_token

log = logging.getLogger(__name__)

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_CONTENT_DISPOSITION_NAME = re.compile(r"""filename\*?=(?:UTF-8'')?["']?([^"';]+)["']?""", re.IGNORECASE)


@dataclass
class FileEntry:
    """One file to fetch: its GDC UUID, expected md5 and size, and where it goes."""

    file_id: str
    md5: str
    size: int | None
    target: Path
    slide_id: str
    #: no name known before the transfer: the server's Content-Disposition names the file
    name_from_server: bool = False
    server_name: str | None = None

    @property
    def part(self) -> Path:
        if self.name_from_server:
            return self.target.parent / f"{self.file_id}.part"
        return self.target.with_name(self.target.name + ".part")


# --------------------------------------------------------------------------- names and paths


def safe_filename(name: str | None, fallback: str) -> str:
    """A bare file name from a server- or manifest-supplied name (``fallback`` if nothing usable).

    Path components of either separator are dropped, as are control characters; ``.``, ``..``,
    empty and hidden names are refused. A name like ``../../etc/x.svs`` becomes ``x.svs``.
    """
    if name:
        base = re.split(r"[/\\]", name.strip())[-1]
        base = "".join(ch for ch in base if ch.isprintable()).strip()
        if base and base not in (".", "..") and not base.startswith("."):
            return base
    return fallback


def contained_path(folder: Path, name: str) -> Path:
    """``folder / name``, refusing anything that resolves outside ``folder``."""
    root = folder.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise DataError(f"file name {name!r} would be written outside the download folder {root}; refused")
    return path


def content_disposition_name(header: str | None) -> str | None:
    if not header:
        return None
    m = _CONTENT_DISPOSITION_NAME.search(header)
    return m.group(1) if m else None


# --------------------------------------------------------------------------- what to fetch


def load_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """A gdc-client manifest (.tsv: id, filename, md5, size) or a cohort table (.csv: file_id, ...).

    Returns columns file_id, filename, md5, size, slide_id. A shipped cohort name
    (``tcga_blca``) stands for its table.
    """
    from .cohorts import COHORTS, load_table

    if str(path) in COHORTS:
        frame = load_table(str(path))
        source = f"cohort table {path}"
    else:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: manifest not found; pass a gdc-client manifest (.tsv) or a cohort table (.csv)")
        sep = "\t" if path.suffix in (".tsv", ".txt") else ","
        frame = pd.read_csv(path, sep=sep, dtype=str)
        source = str(path)
    frame = frame.rename(columns={"id": "file_id"})
    missing = [c for c in ("file_id", "filename", "md5") if c not in frame.columns]
    if missing:
        raise ConfigError(f"{source}: missing column(s) {missing}; a download manifest needs id (or file_id), "
                          "filename, md5 and size")
    if "slide_id" not in frame.columns:
        frame["slide_id"] = frame["filename"].map(lambda n: Path(str(n)).stem)
    if "size" not in frame.columns:
        frame["size"] = None
    return frame[["file_id", "filename", "md5", "size", "slide_id"]].astype({"slide_id": str})


def entries_from_manifest(manifest: pd.DataFrame, out_dir: Path | None, out: Path | None = None,
                          select: list[str] | None = None) -> list[FileEntry]:
    """File entries for the selected slide ids or file UUIDs (all rows without a selection)."""
    if select:
        wanted = set(select)
        chosen = manifest[manifest["slide_id"].isin(wanted) | manifest["file_id"].isin(wanted)]
        unknown = wanted - set(chosen["slide_id"]) - set(chosen["file_id"])
        if unknown:
            raise ConfigError(f"{len(unknown)} id(s) are not in the manifest: {sorted(unknown)[:3]}; "
                              "give slide ids or file UUIDs from it")
    else:
        chosen = manifest
    if out is not None and len(chosen) != 1:
        raise ConfigError(f"--out names one file but {len(chosen)} are selected; select one slide or use --out-dir")
    entries = []
    for row in chosen.itertuples(index=False):
        size = None if pd.isna(row.size) else int(row.size)
        if out is not None:
            target = Path(out).absolute()
        else:
            target = contained_path(out_dir, safe_filename(str(row.filename), fallback=str(row.file_id)))
        entries.append(FileEntry(str(row.file_id), str(row.md5).lower(), size, target, str(row.slide_id)))
    return entries


def entries_from_uuids(client: GDCClient, file_ids: list[str], out_dir: Path) -> list[FileEntry]:
    """File entries for bare UUIDs, with name, md5 and size from the GDC's file metadata."""
    entries = []
    for file_id in file_ids:
        if not _UUID.match(file_id):
            raise ConfigError(f"{file_id!r} is not a GDC file UUID; give UUIDs with --ids or use --manifest")
        meta = client.file_metadata(file_id, fields=["file_id", "file_name", "md5sum", "file_size"])
        if not meta.get("md5sum"):
            raise DataError(f"GDC file {file_id} has no md5sum in its metadata; it cannot be verified, so it is "
                            "not downloaded")
        if not meta.get("file_name"):
            entries.append(FileEntry(file_id, meta["md5sum"].lower(), meta.get("file_size"),
                                     contained_path(out_dir, file_id), file_id, name_from_server=True))
            continue
        name = safe_filename(meta["file_name"], fallback=file_id)
        if name != meta["file_name"]:
            log.warning("GDC file %s: server file name %r reduced to %r", file_id, meta["file_name"], name)
        target = contained_path(out_dir, name)
        entries.append(FileEntry(file_id, meta["md5sum"].lower(), meta.get("file_size"), target, Path(name).stem))
    return entries


# --------------------------------------------------------------------------- checks


def md5_file(path: Path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def bytes_still_needed(entries: list[FileEntry]) -> int:
    """Bytes the pending entries will add to the disk (part files already hold some)."""
    total = 0
    for entry in entries:
        if entry.size is None or (entry.target.exists() and entry.target.stat().st_size == entry.size):
            continue
        have = entry.part.stat().st_size if entry.part.exists() else 0
        total += max(0, entry.size - have)
    return total


def check_free_disk(folder: Path, needed: int, reserve: int) -> None:
    """Fail before starting when ``folder``'s file system lacks ``needed`` + ``reserve`` bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed + reserve:
        raise DataError(f"not enough free disk space in {folder}: the downloads need {needed / 1e9:.2f} GB "
                        f"(+ {reserve / 1e9:.2f} GB kept free) but {free / 1e9:.2f} GB are free; free some space, "
                        "point --out-dir (or the cohort's slides_dir) elsewhere, or download fewer slides")


# --------------------------------------------------------------------------- transfer


class _TransferCut(Exception):
    """The connection broke off in the middle of a body."""


def _body_chunks(response, chunk_size: int):
    """The body of a streamed response as it arrives.

    ``read1`` hands over whatever has arrived (up to ``chunk_size``), so when the connection
    breaks off every byte received before the break is on disk and the resume starts there
    (``iter_content`` would drop a partly filled chunk).
    """
    import requests
    import urllib3

    while True:
        try:
            chunk = response.raw.read1(chunk_size, decode_content=True)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            raise _TransferCut(type(exc).__name__) from exc
        if not chunk:
            return
        yield chunk


class Downloader:
    """Fetches files into their targets: resume, md5 check, bounded parallel connections."""

    def __init__(self, client: GDCClient, verify_tries: int = 3, chunk_size: int = 1 << 20,
                 progress: bool = True):
        if verify_tries < 1:
            raise ConfigError("verify_tries must be at least 1")
        self.client = client
        self.verify_tries = verify_tries
        self.chunk_size = chunk_size
        self.progress = progress
        self._bar = None
        self._bar_lock = threading.Lock()

    # one file --------------------------------------------------------------

    def fetch(self, entry: FileEntry) -> Path:
        """Download one file to its target (kept as is when it is already there with its size)."""
        if (not entry.name_from_server and entry.target.exists()
                and (entry.size is None or entry.target.stat().st_size == entry.size)):
            log.info("%s: already there, kept", entry.target.name)
            self._advance(entry.size or 0)
            return entry.target
        entry.target.parent.mkdir(parents=True, exist_ok=True)
        got = None
        for attempt in range(1, self.verify_tries + 1):
            self._transfer(entry)
            got = md5_file(entry.part)
            if got == entry.md5:
                if entry.name_from_server:
                    self._name_from_server(entry)
                os.replace(entry.part, entry.target)
                log.info("%s: %s bytes, md5 verified", entry.target.name, entry.target.stat().st_size)
                return entry.target
            # A wrong md5 means wrong bytes somewhere in the part file: resuming from it cannot help.
            bad_size = entry.part.stat().st_size
            entry.part.unlink()
            self._advance(-bad_size)
            log.warning("%s: md5 %s does not match the manifest's %s (try %d of %d); fetching it again",
                        entry.target.name, got, entry.md5, attempt, self.verify_tries)
        raise DataError(f"file {entry.file_id} ({entry.target.name}): md5 did not match the manifest after "
                        f"{self.verify_tries} downloads (expected {entry.md5}, last got {got}); no file was kept. "
                        "The transfer corrupts data or the manifest is out of date: check the md5 with "
                        "`mambapath gdc files`, then run again")

    @staticmethod
    def _name_from_server(entry: FileEntry) -> None:
        """Point the target at the server's file name, reduced to a bare name inside the folder."""
        name = safe_filename(entry.server_name, fallback=entry.file_id)
        if name != entry.server_name:
            log.warning("GDC file %s: server file name %r reduced to %r", entry.file_id, entry.server_name, name)
        entry.target = contained_path(entry.target.parent, name)
        entry.slide_id = Path(name).stem

    def _transfer(self, entry: FileEntry) -> None:
        """Bring ``entry.part`` to the full file, resuming after cuts (md5 is checked by the caller)."""
        what = f"file {entry.file_id}"
        cuts = 0
        while True:
            offset = entry.part.stat().st_size if entry.part.exists() else 0
            if entry.size is not None and offset >= entry.size:
                if offset > entry.size:
                    log.warning("%s: part file is larger than the manifest size; starting over", entry.target.name)
                    self._advance(-offset)
                    entry.part.unlink()
                    continue
                return
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            response = self.client.request("GET", f"data/{entry.file_id}", what=what, stream=True, headers=headers)
            with response:
                if response.status_code == 416:
                    # Nothing left to send from this offset: the part file already holds the whole file.
                    return
                if entry.name_from_server and entry.server_name is None:
                    entry.server_name = content_disposition_name(response.headers.get("Content-Disposition"))
                if offset and not self._resumes_at(response, offset):
                    log.warning("%s: server did not resume at byte %d; starting over", entry.target.name, offset)
                    self._advance(-offset)
                    offset = 0
                expected = self._expected_length(response, offset, entry)
                try:
                    with open(entry.part, "ab" if offset else "wb") as fh:
                        for chunk in _body_chunks(response, self.chunk_size):
                            fh.write(chunk)
                            self._advance(len(chunk))
                except _TransferCut as exc:
                    cuts += 1
                    have = entry.part.stat().st_size if entry.part.exists() else 0
                    if cuts > self.client.retries:
                        raise DataError(f"{what} ({entry.target.name}): the transfer broke off {cuts} times "
                                        f"(last at byte {have}); the part file is kept, run again to resume") from exc
                    wait = self.client.wait_before_retry(cuts)
                    log.warning("%s: transfer cut at byte %d (%s); resuming in %.1f s", entry.target.name, have,
                                exc, wait)
                    time.sleep(wait)
                    continue
            have = entry.part.stat().st_size
            if expected is not None and have < expected:
                cuts += 1
                if cuts > self.client.retries:
                    raise DataError(f"{what} ({entry.target.name}): the server ended the transfer early {cuts} "
                                    f"times (last at byte {have} of {expected}); run again to resume")
                log.warning("%s: transfer ended at byte %d of %d; resuming", entry.target.name, have, expected)
                continue
            return

    @staticmethod
    def _resumes_at(response, offset: int) -> bool:
        """Whether a response to a range request continues at ``offset``."""
        if response.status_code != 206:
            return False
        m = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        return bool(m) and int(m.group(1)) == offset

    @staticmethod
    def _expected_length(response, offset: int, entry: FileEntry) -> int | None:
        """Total bytes the part file should hold when this response is complete."""
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit():
            return offset + int(length)
        return entry.size

    # many files -------------------------------------------------------------

    def fetch_all(self, entries: list[FileEntry], max_connections: int = 4) -> list[Path]:
        """Download entries over at most ``max_connections`` parallel connections."""
        from tqdm import tqdm

        if max_connections < 1:
            raise ConfigError("--max-connections must be at least 1")
        total = sum(e.size or 0 for e in entries)
        tty = sys.stderr.isatty()
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="GDC download",
                         disable=not self.progress, mininterval=0.5 if tty else 30.0)
        self._advance(sum(e.part.stat().st_size for e in entries if e.part.exists()))
        done: list[Path] = []
        failures: list[str] = []
        try:
            with ThreadPoolExecutor(max_workers=max_connections) as pool:
                futures = {pool.submit(self.fetch, e): e for e in entries}
                for future in as_completed(futures):
                    try:
                        done.append(future.result())
                    except DataError as exc:
                        failures.append(str(exc))
                        log.error("%s", exc)
        finally:
            self._bar.close()
            self._bar = None
        if failures:
            more = f" (and {len(failures) - 1} more, see the log)" if len(failures) > 1 else ""
            raise DataError(f"{len(failures)} of {len(entries)} downloads failed: {failures[0]}{more}")
        return done

    def _advance(self, n: int) -> None:
        if self._bar is not None and n:
            with self._bar_lock:
                self._bar.update(n)


# --------------------------------------------------------------------------- deleting slides


def delete_slides_with_features(entries: list[FileEntry], features_dir: Path) -> list[FileEntry]:
    """Delete local slides whose features file ``<features_dir>/<slide_id>.h5`` exists.

    Returns the entries still to download (those without features).
    """
    pending = []
    for entry in entries:
        if (features_dir / f"{entry.slide_id}.h5").exists():
            for path in (entry.target, entry.part):
                if path.exists():
                    path.unlink()
                    log.info("%s: features exist, slide deleted", path.name)
        else:
            pending.append(entry)
    return pending


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("what to download")
    src.add_argument("--manifest", help="gdc-client manifest (.tsv), cohort table (.csv) or shipped cohort name")
    src.add_argument("--slides", nargs="+", help="slide ids or file UUIDs of the manifest to fetch (default: all)")
    src.add_argument("--ids", nargs="+", help="file UUIDs to fetch without a manifest (metadata from the GDC API)")
    dst = parser.add_argument_group("where to")
    dst.add_argument("--out-dir", help="download folder (files keep their GDC names)")
    dst.add_argument("--out", help="exact target of a single file (the Snakemake rule uses this)")
    net = parser.add_argument_group("connection")
    net.add_argument("--base-url", default=None, help="GDC API base URL (default: $MAMBAPATH_GDC_URL or the GDC)")
    net.add_argument("--token-file", default=None, help="file holding a GDC token for controlled-access files")
    net.add_argument("--max-connections", type=int, default=4, help="parallel connections (files at once)")
    net.add_argument("--retries", type=int, default=5, help="further tries on 429/5xx, network errors and cuts")
    net.add_argument("--backoff", type=float, default=2.0, help="first wait in seconds; doubles per try")
    net.add_argument("--max-backoff", type=float, default=120.0, help="longest wait without a Retry-After")
    net.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    net.add_argument("--verify-tries", type=int, default=3,
                     help="downloads of a file before an md5 mismatch is an error")
    disk = parser.add_argument_group("disk")
    disk.add_argument("--min-free-gb", type=float, default=1.0, help="free space to keep beyond the downloads")
    disk.add_argument("--delete-with-features", metavar="FEATURES_DIR",
                      help="delete (and do not fetch) slides whose <FEATURES_DIR>/<slide_id>.h5 exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if bool(args.out) == bool(args.out_dir):
        raise ConfigError("give exactly one of --out (one file) or --out-dir (a folder)")
    if bool(args.manifest) == bool(args.ids):
        raise ConfigError("give --manifest (with optional --slides) or --ids (file UUIDs), not both or neither")
    token_file = args.token_file or None  # the Snakemake rule passes --token-file= when there is none
    client = GDCClient(args.base_url, token=read_token(token_file), token_file=token_file,
                       timeout=args.timeout, retries=args.retries, backoff=args.backoff, max_backoff=args.max_backoff)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.out).absolute().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.manifest:
        entries = entries_from_manifest(load_manifest(args.manifest), out_dir, Path(args.out) if args.out else None,
                                        args.slides)
    else:
        if args.out and len(args.ids) != 1:
            raise ConfigError("--out names one file; give one UUID with --ids or use --out-dir")
        entries = entries_from_uuids(client, args.ids, out_dir)
        if args.out:
            entries[0].target = Path(args.out).absolute()
    if args.delete_with_features:
        entries = delete_slides_with_features(entries, Path(args.delete_with_features))
    check_free_disk(out_dir, bytes_still_needed(entries), int(args.min_free_gb * 1e9))
    downloader = Downloader(client, verify_tries=args.verify_tries, progress=not args.no_progress)
    paths = downloader.fetch_all(entries, max_connections=args.max_connections)
    log.info("%d file(s) downloaded and verified in %s", len(paths), out_dir)
    return 0
