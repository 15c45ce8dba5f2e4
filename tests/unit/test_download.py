"""Fault tests of verified, resumable GDC downloads against a loopback server.

The server serves the real TCGA slide from ../shared/data/wsi under its real GDC UUID; the
expected md5 comes from the GDC manifest in ../shared/data/gdc, never from the code under test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
import time
from collections import namedtuple
from pathlib import Path

import pandas as pd
import pytest

from mambapath import cli
from mambapath.download import (
    Downloader,
    FileEntry,
    check_free_disk,
    content_disposition_name,
    delete_slides_with_features,
    entries_from_manifest,
    entries_from_uuids,
    load_manifest,
    safe_filename,
)
from mambapath.errors import ConfigError, DataError
from mambapath.gdc import GDCClient

_spec = importlib.util.spec_from_file_location("gdc_server", Path(__file__).parents[1] / "gdc_server.py")
gdc_server = importlib.util.module_from_spec(_spec)
sys.modules["gdc_server"] = gdc_server  # dataclasses look their module up by name
_spec.loader.exec_module(gdc_server)
MockFile, MockGDC = gdc_server.MockFile, gdc_server.MockGDC

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SLIDE_PATH = SHARED / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"
MANIFEST_PATH = SHARED / "gdc" / "gdc_manifest.tsv"
SLIDE_UUID = "d3948ef0-87f8-4c30-a316-099f3516efe9"
SLIDE_MD5 = "0ffa48ecfb03c832b9532e90ca29ade4"

Slide = namedtuple("Slide", "file_id file_name md5 size data")


@pytest.fixture(scope="module")
def slide() -> Slide:
    if not SLIDE_PATH.exists() or not MANIFEST_PATH.exists():
        pytest.skip(f"../shared/data not found: needs {SLIDE_PATH} and {MANIFEST_PATH}")
    manifest = pd.read_csv(MANIFEST_PATH, sep="\t").set_index("id")
    row = manifest.loc[SLIDE_UUID]
    data = SLIDE_PATH.read_bytes()
    assert row["md5"] == SLIDE_MD5 and int(row["size"]) == len(data)
    return Slide(SLIDE_UUID, row["filename"], row["md5"], int(row["size"]), data)


def mock_file(slide: Slide, **kw) -> MockFile:
    return MockFile(slide.file_id, slide.file_name, slide.data, **kw)


def entry_for(slide: Slide, out_dir: Path, md5: str | None = None) -> FileEntry:
    return FileEntry(slide.file_id, md5 or slide.md5, slide.size, out_dir / slide.file_name, Path(slide.file_name).stem)


def client_for(server: MockGDC, **kw) -> GDCClient:
    kw.setdefault("retries", 3)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 10.0)
    return GDCClient(server.url, **kw)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- happy path and resume


def test_download_verifies_real_slide(slide, tmp_path):
    with MockGDC([mock_file(slide)]) as server:
        path = Downloader(client_for(server), progress=False).fetch(entry_for(slide, tmp_path))
    assert path == tmp_path / slide.file_name
    assert md5_of(path) == SLIDE_MD5
    assert files_under(tmp_path) == [slide.file_name]  # no part file left
    assert [r.status for r in server.data_requests()] == [200]


def test_transfer_cut_mid_file_resumes_with_range(slide, tmp_path):
    cut_at = 1_500_000
    with MockGDC([mock_file(slide, script=[("cut", cut_at)])]) as server:
        path = Downloader(client_for(server), progress=False).fetch(entry_for(slide, tmp_path))
    requests = server.data_requests()
    assert [r.range for r in requests] == [None, f"bytes={cut_at}-"]
    assert [r.status for r in requests] == [200, 206]
    assert requests[1].bytes_sent == slide.size - cut_at  # only the rest was sent again
    assert md5_of(path) == SLIDE_MD5


def test_part_file_of_killed_run_resumes(slide, tmp_path):
    entry = entry_for(slide, tmp_path)
    half = slide.size // 2
    entry.part.write_bytes(slide.data[:half])
    with MockGDC([mock_file(slide)]) as server:
        Downloader(client_for(server), progress=False).fetch(entry)
    assert [r.range for r in server.data_requests()] == [f"bytes={half}-"]
    assert md5_of(entry.target) == SLIDE_MD5
    assert not entry.part.exists()


def test_server_ignoring_range_restarts_file(slide, tmp_path):
    entry = entry_for(slide, tmp_path)
    entry.part.write_bytes(slide.data[:1000])
    with MockGDC([mock_file(slide, script=[("ignore_range",)])]) as server:
        Downloader(client_for(server), progress=False).fetch(entry)
    assert [r.status for r in server.data_requests()] == [200]
    assert md5_of(entry.target) == SLIDE_MD5  # the 200 body replaced the part, not appended to it


def test_existing_complete_target_is_kept_without_request(slide, tmp_path):
    entry = entry_for(slide, tmp_path)
    entry.target.write_bytes(slide.data)
    with MockGDC([mock_file(slide)]) as server:
        Downloader(client_for(server), progress=False).fetch(entry)
    assert server.data_requests() == []


# --------------------------------------------------------------------------- md5


def test_corrupted_bytes_fail_md5_then_fetched_again(slide, tmp_path):
    with MockGDC([mock_file(slide, script=[("corrupt",)])]) as server:
        path = Downloader(client_for(server), verify_tries=3, progress=False).fetch(entry_for(slide, tmp_path))
    assert len(server.data_requests()) == 2
    assert md5_of(path) == SLIDE_MD5


def test_persistent_corruption_gives_clear_error_and_no_complete_file(slide, tmp_path):
    with MockGDC([mock_file(slide, script=[("corrupt",)] * 5)]) as server:
        with pytest.raises(DataError) as err:
            Downloader(client_for(server), verify_tries=3, progress=False).fetch(entry_for(slide, tmp_path))
    msg = str(err.value)
    assert "md5" in msg and "after 3 downloads" in msg and SLIDE_UUID in msg and SLIDE_MD5 in msg
    assert len(server.data_requests()) == 3
    assert files_under(tmp_path) == []  # neither the target nor a part file is left


# --------------------------------------------------------------------------- rate limits and server errors


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(slide, tmp_path, status):
    # The client's own backoff is 0.01 s, so a wait of >= 1 s can only come from Retry-After.
    with MockGDC([mock_file(slide, script=[("status", status, 1)])]) as server:
        t0 = time.monotonic()
        Downloader(client_for(server), progress=False).fetch(entry_for(slide, tmp_path))
        elapsed = time.monotonic() - t0
    first, second = server.data_requests()
    assert first.status == status and second.status == 200
    assert second.time - first.time >= 0.95
    assert elapsed >= 0.95


def test_retry_after_as_http_date(slide, tmp_path):
    from email.utils import formatdate

    when = formatdate(time.time() + 2, usegmt=True)  # 1-2 s ahead at whole-second resolution
    with MockGDC([mock_file(slide, script=[("status", 503, when)])]) as server:
        Downloader(client_for(server), progress=False).fetch(entry_for(slide, tmp_path))
    first, second = server.data_requests()
    assert second.time - first.time >= 0.9


def test_server_errors_without_retry_after_back_off_then_give_up(slide, tmp_path):
    with MockGDC([mock_file(slide, script=[("status", 500, None)] * 10)]) as server:
        client = client_for(server, retries=2, backoff=0.2)
        with pytest.raises(DataError, match="HTTP 500"):
            Downloader(client, progress=False).fetch(entry_for(slide, tmp_path))
    times = [r.time for r in server.data_requests()]
    assert len(times) == 3  # first try + 2 retries
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] >= 0.19 and gaps[1] >= 0.39  # 0.2 s, then doubled
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("served_name", ["../../escape.svs", "/tmp/escape.svs", "..\\..\\escape.svs"])
def test_server_file_name_cannot_escape_download_folder(slide, tmp_path, served_name):
    out_dir = tmp_path / "downloads"
    out_dir.mkdir()
    started = time.time()
    with MockGDC([mock_file(slide, served_name=served_name)]) as server:
        client = client_for(server)
        entries = entries_from_uuids(client, [SLIDE_UUID], out_dir)
        Downloader(client, progress=False).fetch_all(entries)
    assert files_under(tmp_path) == ["downloads/escape.svs"]
    assert not Path("/tmp/escape.svs").exists() or Path("/tmp/escape.svs").stat().st_mtime < started
    assert md5_of(out_dir / "escape.svs") == SLIDE_MD5


@pytest.mark.parametrize("served_name, saved_as", [("../../escape.svs", "escape.svs"), ("..", SLIDE_UUID)])
def test_content_disposition_name_cannot_escape_download_folder(slide, tmp_path, served_name, saved_as):
    out_dir = tmp_path / "downloads"
    out_dir.mkdir()
    with MockGDC([mock_file(slide, served_name=served_name, metadata_name=False)]) as server:
        client = client_for(server)
        entries = entries_from_uuids(client, [SLIDE_UUID], out_dir)
        Downloader(client, progress=False).fetch_all(entries)
    assert files_under(tmp_path) == [f"downloads/{saved_as}"]
    assert md5_of(out_dir / saved_as) == SLIDE_MD5


def test_unusable_server_name_falls_back_to_uuid(slide, tmp_path):
    with MockGDC([mock_file(slide, served_name="..")]) as server:
        client = client_for(server)
        (entry,) = entries_from_uuids(client, [SLIDE_UUID], tmp_path)
    assert entry.target == tmp_path.resolve() / SLIDE_UUID


def test_safe_filename_and_content_disposition():
    assert safe_filename("a/b/../c.svs", "x") == "c.svs"
    assert safe_filename("C:\\x\\y.svs", "x") == "y.svs"
    assert safe_filename(".hidden", "x") == "x"
    assert safe_filename("bad\x00name.svs", "x") == "badname.svs"
    assert content_disposition_name('attachment; filename="../e.svs"') == "../e.svs"
    assert content_disposition_name("attachment; filename*=UTF-8''s.svs") == "s.svs"


def test_manifest_name_with_path_components_stays_inside(tmp_path):
    manifest = pd.DataFrame({"file_id": [SLIDE_UUID], "filename": ["../../x.svs"], "md5": [SLIDE_MD5],
                             "size": [10], "slide_id": ["x"]})
    (entry,) = entries_from_manifest(manifest, tmp_path)
    assert entry.target == tmp_path.resolve() / "x.svs"


# --------------------------------------------------------------------------- token


def test_missing_token_gives_clear_error(slide, tmp_path):
    with MockGDC([mock_file(slide, access="controlled")], token="good-token") as server:
        with pytest.raises(DataError) as err:
            Downloader(client_for(server), progress=False).fetch(entry_for(slide, tmp_path))
    assert "controlled-access" in str(err.value) and "--token-file" in str(err.value)
    assert len(server.data_requests()) == 1  # an access error is not retried
    assert files_under(tmp_path) == []


def test_expired_token_gives_clear_error_without_the_token(slide, tmp_path, caplog):
    secret = "expired-token-7f3a9c"
    token_file = tmp_path / "gdc-token.txt"
    token_file.write_text(secret + "\n")
    out_dir = tmp_path / "out"
    caplog.set_level(logging.DEBUG)
    with MockGDC([mock_file(slide, access="controlled")], token="good-token") as server:
        code = cli.main(["download", "--ids", SLIDE_UUID, "--out-dir", str(out_dir), "--base-url", server.url,
                         "--token-file", str(token_file), "--backoff", "0.01", "--no-progress"])
    assert code == 2
    assert server.data_requests()[0].token == secret  # sent as X-Auth-Token
    assert server.data_requests()[0].status == 403
    assert secret not in caplog.text
    assert not out_dir.exists() or files_under(out_dir) == []


def test_expired_token_message_names_file_not_token(slide, tmp_path, capsys):
    secret = "expired-token-7f3a9c"
    token_file = tmp_path / "gdc-token.txt"
    token_file.write_text(secret)
    with MockGDC([mock_file(slide, access="controlled")], token="good-token") as server:
        client = client_for(server, token=secret, token_file=str(token_file))
        with pytest.raises(DataError) as err:
            Downloader(client, progress=False).fetch(entry_for(slide, tmp_path))
    assert str(token_file) in str(err.value) and "expired" in str(err.value)
    assert secret not in str(err.value) and secret not in repr(client)


def test_valid_token_downloads_controlled_file(slide, tmp_path):
    with MockGDC([mock_file(slide, access="controlled")], token="good-token") as server:
        Downloader(client_for(server, token="good-token"), progress=False).fetch(entry_for(slide, tmp_path))
    assert md5_of(tmp_path / slide.file_name) == SLIDE_MD5


def test_missing_or_empty_token_file_is_a_config_error(tmp_path):
    from mambapath.gdc import read_token

    with pytest.raises(ConfigError, match="not found"):
        read_token(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_token(tmp_path / "empty.txt")


# --------------------------------------------------------------------------- parallel, disk, deleting


def test_parallel_connections_are_bounded(slide, tmp_path):
    ids = [f"{SLIDE_UUID[:-1]}{i}" for i in range(4)]
    files = [MockFile(i, f"slide{n}.svs", slide.data, delay=0.3) for n, i in enumerate(ids)]
    with MockGDC(files) as server:
        entries = [FileEntry(f.file_id, slide.md5, slide.size, tmp_path / f.file_name, f.file_id) for f in files]
        Downloader(client_for(server), progress=False).fetch_all(entries, max_connections=2)
    assert server.max_active_data == 2
    assert all(md5_of(tmp_path / f.file_name) == SLIDE_MD5 for f in files)


def test_free_disk_check_fails_before_any_request(slide, tmp_path, monkeypatch):
    import shutil as _shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DataError, match="not enough free disk space") as err:
        check_free_disk(tmp_path, needed=slide.size, reserve=0)
    assert str(tmp_path) in str(err.value)


def test_cli_free_disk_check_runs_before_download(slide, tmp_path, monkeypatch):
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"id\tfilename\tmd5\tsize\tstate\n{SLIDE_UUID}\t{slide.file_name}\t{slide.md5}\t"
                        f"{slide.size}\treleased\n")
    with MockGDC([mock_file(slide)]) as server:
        code = cli.main(["download", "--manifest", str(manifest), "--out-dir", str(tmp_path / "o"),
                         "--base-url", server.url, "--min-free-gb", "1e9", "--no-progress"])
    assert code == 2
    assert server.data_requests() == []


def test_delete_with_features(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    (features / "a.h5").write_bytes(b"h5")
    entries = [FileEntry("1", "0" * 32, 2, tmp_path / "a.svs", "a"),
               FileEntry("2", "0" * 32, 2, tmp_path / "b.svs", "b")]
    entries[0].target.write_bytes(b"aa")
    entries[1].target.write_bytes(b"bb")
    pending = delete_slides_with_features(entries, features)
    assert [e.slide_id for e in pending] == ["b"]
    assert not entries[0].target.exists() and entries[1].target.exists()


def test_cli_download_from_manifest_selects_slide(slide, tmp_path):
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"id\tfilename\tmd5\tsize\tstate\n{SLIDE_UUID}\t{slide.file_name}\t{slide.md5}\t"
                        f"{slide.size}\treleased\n")
    target = tmp_path / "slides" / "TCGA-CR-7395.svs"
    with MockGDC([mock_file(slide)]) as server:
        code = cli.main(["download", "--manifest", str(manifest), "--slides", Path(slide.file_name).stem,
                         "--out", str(target), "--base-url", server.url, "--no-progress"])
    assert code == 0
    assert md5_of(target) == SLIDE_MD5


def test_manifest_loader_rejects_unknown_ids(tmp_path):
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"id\tfilename\tmd5\tsize\n{SLIDE_UUID}\tx.svs\t{SLIDE_MD5}\t3\n")
    frame = load_manifest(manifest)
    with pytest.raises(ConfigError, match="not in the manifest"):
        entries_from_manifest(frame, tmp_path, select=["nope"])
