"""A small client for the NCI Genomic Data Commons (GDC) API.

Endpoints used (https://docs.gdc.cancer.gov/API/Users_Guide/):

- ``POST /files`` and ``POST /cases``: search with a ``filters`` JSON tree, a comma-separated
  ``fields`` list and ``size``/``from`` pagination (``from`` is the 0-based offset of the first
  hit; ``data.pagination.total`` says how many hits match);
- ``GET /files/<uuid>``: one file's metadata;
- ``GET /data/<uuid>``: one file's bytes (see :mod:`mambapath.download`).

Whole-slide images are ``data_type = "Slide Image"``; diagnostic slides (FFPE, ``DX`` in the
barcode) have ``experimental_strategy = "Diagnostic Slide"``, frozen-section slides (``TS``,
``BS``) ``"Tissue Slide"``. Controlled-access requests carry the token in the ``X-Auth-Token``
header. The token is read from a file, kept out of logs, reprs and error messages.

The base URL is configurable (``--base-url`` or ``MAMBAPATH_GDC_URL``), which the tests use to
point the client at a loopback server.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from .errors import ConfigError, DataError
from .io import write_csv, write_text

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.gdc.cancer.gov"

#: slide kind -> GDC experimental_strategy values
SLIDE_STRATEGIES = {
    "diagnostic": ["Diagnostic Slide"],
    "tissue": ["Tissue Slide"],
    "all": ["Diagnostic Slide", "Tissue Slide"],
}

FILE_FIELDS = [
    "file_id", "file_name", "md5sum", "file_size", "state", "access", "data_type", "data_format",
    "experimental_strategy", "cases.submitter_id", "cases.case_id", "cases.project.project_id",
]
CASE_FIELDS = [
    "case_id", "submitter_id", "project.project_id", "diagnoses.ajcc_pathologic_stage",
    "diagnoses.days_to_last_follow_up", "demographic.vital_status", "demographic.days_to_death",
]

#: statuses worth another try: rate limiting and server-side trouble
RETRY_STATUSES = {429, 500, 502, 503, 504}
#: gdc-client download manifest columns
MANIFEST_COLUMNS = ["id", "filename", "md5", "size", "state"]


def default_base_url() -> str:
    return os.environ.get("MAMBAPATH_GDC_URL", DEFAULT_BASE_URL)


def read_token(path: str | os.PathLike | None) -> str | None:
    """The controlled-access token from a file (None without a file)."""
    if path is None:
        return None
    path = Path(path).expanduser()
    try:
        token = path.read_text().strip()
    except FileNotFoundError as exc:
        raise ConfigError(f"token file {path} not found; download a token from the GDC Data Portal "
                          "(your user name > Download Token) and pass its path with --token-file") from exc
    except OSError as exc:
        raise ConfigError(f"token file {path} cannot be read ({exc.strerror}); check its permissions") from exc
    if not token:
        raise ConfigError(f"token file {path} is empty; download a new token from the GDC Data Portal")
    return token


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def in_filter(field: str, values: Iterable) -> dict:
    return {"op": "in", "content": {"field": field, "value": list(values)}}


def and_filter(*parts: dict) -> dict:
    return {"op": "and", "content": [p for p in parts if p]}


def slide_filter(projects: Iterable[str], kind: str = "diagnostic") -> dict:
    """Filters for the slide images of some projects, diagnostic (FFPE) or tissue (frozen)."""
    if kind not in SLIDE_STRATEGIES:
        raise ConfigError(f"slide kind {kind!r} is not one of {sorted(SLIDE_STRATEGIES)}")
    return and_filter(
        in_filter("cases.project.project_id", projects),
        in_filter("files.data_type", ["Slide Image"]),
        in_filter("files.experimental_strategy", SLIDE_STRATEGIES[kind]),
    )


class GDCClient:
    """GDC API requests with retries: 429/5xx honour Retry-After, other failures back off.

    ``retries`` counts further tries after the first; the wait before try k is the server's
    Retry-After when it sends one, else ``backoff * 2**(k-1)`` capped at ``max_backoff``.
    """

    def __init__(self, base_url: str | None = None, token: str | None = None, token_file: str | None = None,
                 timeout: float = 60.0, retries: int = 5, backoff: float = 2.0, max_backoff: float = 120.0):
        self.base_url = (base_url or default_base_url()).rstrip("/")
        self._token = token
        self.token_file = str(token_file) if token_file else None
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._local = threading.local()

    def __repr__(self) -> str:
        # never show the token
        return f"GDCClient({self.base_url!r}, token={'set' if self._token else 'none'})"

    @property
    def session(self):
        """One requests.Session per thread (sessions are not shared between threads)."""
        import requests

        if getattr(self._local, "session", None) is None:
            self._local.session = requests.Session()
        return self._local.session

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def wait_before_retry(self, attempt: int, response=None) -> float:
        """Seconds to wait before try ``attempt`` + 1 (attempt counts from 1)."""
        header = response.headers.get("Retry-After") if response is not None else None
        server_wait = retry_after_seconds(header)
        if server_wait is not None:
            return server_wait
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1))

    def request(self, method: str, path: str, *, what: str, stream: bool = False, headers: dict | None = None,
                **kwargs):
        """One API call with retries; returns a response with a 2xx status (or 416 for ranges).

        ``what`` names the request in errors ("file <uuid>", "query of /files"). A 401/403 is
        an access error at once (retrying does not fix a token); other 4xx are errors too.
        """
        import requests

        send_headers = dict(headers or {})
        if self._token:
            send_headers["X-Auth-Token"] = self._token
        url = self.url(path)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.session.request(method, url, headers=send_headers, stream=stream,
                                                timeout=self.timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt > self.retries:
                    raise DataError(f"GDC {what}: no answer from {self.base_url} after {attempt} tries "
                                    f"({type(exc).__name__}); check the network or --base-url") from exc
                wait = self.wait_before_retry(attempt)
                log.warning("GDC %s: %s; try %d of %d in %.1f s", what, type(exc).__name__, attempt + 1,
                            self.retries + 1, wait)
                time.sleep(wait)
                continue
            status = response.status_code
            if status < 300 or status == 416:
                return response
            response.close()
            if status in (401, 403):
                raise DataError(self._access_message(what, status))
            if status in RETRY_STATUSES and attempt <= self.retries:
                wait = self.wait_before_retry(attempt, response)
                log.warning("GDC %s: HTTP %d%s; try %d of %d in %.1f s", what, status,
                            " (Retry-After)" if response.headers.get("Retry-After") else "",
                            attempt + 1, self.retries + 1, wait)
                time.sleep(wait)
                continue
            if status == 404:
                raise DataError(f"GDC {what}: not found at {self.base_url} (HTTP 404); check the UUID "
                                "(`mambapath gdc files` lists current slide UUIDs)")
            raise DataError(f"GDC {what}: HTTP {status} from {self.base_url} after {attempt} "
                            f"tr{'y' if attempt == 1 else 'ies'}; try again later or lower --max-connections")

    def _access_message(self, what: str, status: int) -> str:
        if self._token:
            return (f"GDC {what}: access refused (HTTP {status}) with the token from "
                    f"{self.token_file or 'the given token'}: the token is expired or does not grant this "
                    "controlled-access file; download a new token from the GDC Data Portal and pass --token-file")
        return (f"GDC {what}: access refused (HTTP {status}); the file is controlled-access and no token was "
                "given: pass --token-file with a token from the GDC Data Portal (or download.token_file in the config)")

    # ------------------------------------------------------------------ search and retrieval

    def query(self, endpoint: str, filters: dict | None = None, fields: Iterable[str] = (),
              page_size: int = 500, max_hits: int | None = None) -> list[dict]:
        """All hits of a search on /files or /cases, page by page."""
        hits: list[dict] = []
        offset = 0
        while True:
            size = page_size if max_hits is None else min(page_size, max_hits - len(hits))
            body = {"fields": ",".join(fields), "size": size, "from": offset, "format": "json"}
            if filters:
                body["filters"] = filters
            response = self.request("POST", endpoint, what=f"query of /{endpoint}", json=body)
            try:
                data = response.json()["data"]
                page, total = data["hits"], int(data["pagination"]["total"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"GDC query of /{endpoint}: the answer from {self.base_url} is not a GDC "
                                "search result (no data.hits / data.pagination); check --base-url") from exc
            hits.extend(page)
            offset += len(page)
            log.debug("GDC /%s: %d of %d hits", endpoint, len(hits), total)
            if not page or offset >= total or (max_hits is not None and len(hits) >= max_hits):
                return hits

    def file_metadata(self, file_id: str, fields: Iterable[str] = FILE_FIELDS) -> dict:
        response = self.request("GET", f"files/{file_id}", what=f"metadata of file {file_id}",
                                params={"fields": ",".join(fields)})
        try:
            return response.json()["data"]
        except (ValueError, KeyError) as exc:
            raise DataError(f"GDC metadata of file {file_id}: not a GDC answer; check --base-url") from exc

    def slide_files(self, projects: Iterable[str], kind: str = "diagnostic", page_size: int = 500) -> pd.DataFrame:
        """Slide image files of some projects as a table (one row per file)."""
        projects = list(projects)
        hits = self.query("files", slide_filter(projects, kind), FILE_FIELDS, page_size=page_size)
        if not hits:
            raise DataError(f"GDC query returned no {kind} slide files for project(s) {', '.join(projects)} at "
                            f"{self.base_url}; check the project ids (e.g. TCGA-BLCA) and --kind")
        return files_table(hits)

    def cases(self, projects: Iterable[str], page_size: int = 500) -> pd.DataFrame:
        """Cases of some projects with stage and overall-survival fields (one row per case)."""
        projects = list(projects)
        hits = self.query("cases", in_filter("project.project_id", projects), CASE_FIELDS, page_size=page_size)
        if not hits:
            raise DataError(f"GDC query returned no cases for project(s) {', '.join(projects)} at {self.base_url}; "
                            "check the project ids (e.g. TCGA-BLCA)")
        return cases_table(hits)


def _first(items: Any, key: str) -> Any:
    """The first non-null ``key`` of a list of dicts (GDC nests cases and diagnoses as lists)."""
    if isinstance(items, dict):
        items = [items]
    for item in items or []:
        value = item.get(key)
        if value is not None:
            return value
    return None


def files_table(hits: list[dict]) -> pd.DataFrame:
    rows = []
    for hit in hits:
        cases = hit.get("cases") or []
        rows.append({
            "file_id": hit.get("file_id") or hit.get("id"),
            "file_name": hit.get("file_name"),
            "md5sum": hit.get("md5sum"),
            "file_size": hit.get("file_size"),
            "state": hit.get("state"),
            "access": hit.get("access"),
            "experimental_strategy": hit.get("experimental_strategy"),
            "patient_id": _first(cases, "submitter_id"),
            "case_id": _first(cases, "case_id"),
            "project_id": _first([c.get("project") or {} for c in cases], "project_id"),
        })
    return pd.DataFrame(rows)


def cases_table(hits: list[dict]) -> pd.DataFrame:
    """Cases with their stage (I-IV) and overall survival (days, event) as in the cohort tables."""
    from .cohorts import map_stage

    rows = []
    for hit in hits:
        diagnoses = hit.get("diagnoses") or []
        demographic = hit.get("demographic") or {}
        stage_text = _first(diagnoses, "ajcc_pathologic_stage")
        # GDC writes "Stage IIA" (older releases "stage iia"); map_stage wants the CDR's spelling
        stage_cdr = stage_text.strip().upper().replace("STAGE ", "Stage ") if isinstance(stage_text, str) else None
        vital = (demographic.get("vital_status") or "").lower()
        days_to_death = demographic.get("days_to_death")
        follow_up = _first(diagnoses, "days_to_last_follow_up")
        if vital == "dead" and days_to_death is not None:
            os_days, os_event = days_to_death, 1
        elif vital == "alive" and follow_up is not None:
            os_days, os_event = follow_up, 0
        else:
            os_days, os_event = None, None
        rows.append({
            "patient_id": hit.get("submitter_id"),
            "case_id": hit.get("case_id") or hit.get("id"),
            "project_id": (hit.get("project") or {}).get("project_id"),
            "ajcc_pathologic_stage": stage_text,
            "stage": map_stage(stage_cdr),
            "vital_status": demographic.get("vital_status"),
            "days_to_death": days_to_death,
            "days_to_last_follow_up": follow_up,
            "os_days": os_days,
            "os_event": os_event,
        })
    frame = pd.DataFrame(rows)
    frame["os_event"] = frame["os_event"].astype("Int64")
    return frame


def manifest_frame(files: pd.DataFrame) -> pd.DataFrame:
    """A gdc-client download manifest (id, filename, md5, size, state) from a files table."""
    columns = {"file_id": "id", "file_name": "filename", "md5sum": "md5", "file_size": "size"}
    if "filename" in files.columns and "file_name" not in files.columns:
        columns = {"file_id": "id", "filename": "filename", "md5": "md5", "size": "size"}
    frame = files.rename(columns=columns)
    if "state" not in frame.columns:
        frame["state"] = "released"
    return frame[MANIFEST_COLUMNS]


def write_manifest(path: str | os.PathLike, files: pd.DataFrame) -> pd.DataFrame:
    manifest = manifest_frame(files)
    with_size = manifest.assign(size=manifest["size"].astype("int64"))
    write_text(path, with_size.to_csv(sep="\t", index=False))
    return with_size


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=None,
                        help=f"GDC API base URL (default: $MAMBAPATH_GDC_URL or {DEFAULT_BASE_URL})")
    common.add_argument("--token-file", default=None, help="file holding a GDC token (controlled-access data)")
    common.add_argument("--retries", type=int, default=5, help="further tries on 429/5xx and network errors")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    common.add_argument("--page-size", type=int, default=500, help="hits per page of a search")

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("files", parents=[common], help="slide image files of projects; writes a manifest or table")
    p.add_argument("--project", action="append", required=True, help="GDC project id, e.g. TCGA-BLCA (repeatable)")
    p.add_argument("--kind", default="diagnostic", choices=list(SLIDE_STRATEGIES),
                   help="diagnostic = FFPE DX slides; tissue = frozen TS/BS slides")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--format", default="manifest", choices=["manifest", "csv", "json"],
                   help="manifest = gdc-client download manifest (tab-separated)")

    p = sub.add_parser("cases", parents=[common], help="cases of projects: stage, vital status, survival days")
    p.add_argument("--project", action="append", required=True)
    p.add_argument("--out", required=True, help="output CSV")

    p = sub.add_parser("manifest", help="gdc-client manifest of a shipped cohort table (offline)")
    p.add_argument("cohort", help="shipped cohort name (tcga_blca, ...) or a cohort table CSV")
    p.add_argument("--out", required=True, help="manifest .tsv to write")


def run(args: argparse.Namespace) -> int:
    if args.action == "manifest":
        from .cohorts import load_table

        manifest = write_manifest(args.out, load_table(args.cohort))
        print(f"{args.out}: {len(manifest)} files, {manifest['size'].sum() / 1e9:.1f} GB")
        return 0
    client = GDCClient(args.base_url, token=read_token(args.token_file), token_file=args.token_file,
                       timeout=args.timeout, retries=args.retries)
    if args.action == "files":
        files = client.slide_files(args.project, args.kind, page_size=args.page_size)
        if args.format == "manifest":
            write_manifest(args.out, files)
        elif args.format == "csv":
            write_csv(args.out, files)
        else:
            write_text(args.out, json.dumps(files.to_dict("records"), indent=1) + "\n")
        print(f"{args.out}: {len(files)} {args.kind} slide files, {files['file_size'].sum() / 1e9:.1f} GB")
        return 0
    if args.action == "cases":
        cases = client.cases(args.project, page_size=args.page_size)
        write_csv(args.out, cases)
        print(f"{args.out}: {len(cases)} cases")
        return 0
    raise ConfigError(f"unknown action {args.action!r}")
