"""The GDC API client against a loopback server: filters, fields, pagination, manifests, errors."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mambapath import cli
from mambapath.download import load_manifest
from mambapath.errors import DataError
from mambapath.gdc import GDCClient, retry_after_seconds, slide_filter, write_manifest

_spec = importlib.util.spec_from_file_location("gdc_server", Path(__file__).parents[1] / "gdc_server.py")
gdc_server = importlib.util.module_from_spec(_spec)
sys.modules["gdc_server"] = gdc_server
_spec.loader.exec_module(gdc_server)
MockFile, MockGDC = gdc_server.MockFile, gdc_server.MockGDC


def make_files() -> list[MockFile]:
    """7 BLCA diagnostic slides, 2 BLCA frozen slides, 3 LUAD diagnostic slides (distinct bytes)."""
    files = []
    for i in range(12):
        project = "TCGA-LUAD" if i >= 9 else "TCGA-BLCA"
        frozen = i in (7, 8)
        patient = f"TCGA-AA-{1000 + i}"
        code = "01A-01-TS1" if frozen else "01Z-00-DX1"
        files.append(MockFile(f"00000000-0000-0000-0000-{i:012d}", f"{patient}-{code}.ABC{i}.svs",
                              bytes([i]) * (100 + i),
                              project_id=project, case_submitter_id=patient,
                              experimental_strategy="Tissue Slide" if frozen else "Diagnostic Slide"))
    return files


CASES = [
    {"case_id": "c1", "submitter_id": "TCGA-AA-1000", "project": {"project_id": "TCGA-BLCA"},
     "diagnoses": [{"ajcc_pathologic_stage": "Stage IIIA", "days_to_last_follow_up": None}],
     "demographic": {"vital_status": "Dead", "days_to_death": 400}},
    {"case_id": "c2", "submitter_id": "TCGA-AA-1001", "project": {"project_id": "TCGA-BLCA"},
     "diagnoses": [{"ajcc_pathologic_stage": "stage ii", "days_to_last_follow_up": 900}],
     "demographic": {"vital_status": "Alive", "days_to_death": None}},
    {"case_id": "c3", "submitter_id": "TCGA-AA-1002", "project": {"project_id": "TCGA-BLCA"},
     "diagnoses": [{"ajcc_pathologic_stage": "Stage X", "days_to_last_follow_up": None}],
     "demographic": {"vital_status": "Not Reported"}},
    {"case_id": "c9", "submitter_id": "TCGA-AA-1009", "project": {"project_id": "TCGA-LUAD"},
     "diagnoses": [], "demographic": {}},
]


def test_slide_files_filters_and_paginates():
    files = make_files()
    with MockGDC(files) as server:
        table = GDCClient(server.url, backoff=0.01).slide_files(["TCGA-BLCA"], "diagnostic", page_size=3)
    expected = {f.file_id for f in files
                if f.project_id == "TCGA-BLCA" and f.experimental_strategy == "Diagnostic Slide"}
    assert set(table["file_id"]) == expected and len(table) == 7
    searches = [r for r in server.log if r.path.startswith("/files")]
    assert len(searches) == 3  # 7 hits in pages of 3
    by_id = {f.file_id: f for f in files}
    for row in table.itertuples():
        f = by_id[row.file_id]
        assert (row.md5sum, row.file_size, row.patient_id, row.project_id) == (f.md5, len(f.data), f.case_submitter_id,
                                                                               "TCGA-BLCA")


def test_query_sends_documented_body():
    with MockGDC(make_files()) as server:
        captured = []
        client = GDCClient(server.url, backoff=0.01)
        original = client.session.request

        def spy(method, url, **kw):
            captured.append(kw.get("json"))
            return original(method, url, **kw)

        client.session.request = spy
        client.query("files", slide_filter(["TCGA-LUAD"], "tissue"), ["file_id", "md5sum"], page_size=50)
    body = captured[0]
    assert body["from"] == 0 and body["size"] == 50 and body["fields"] == "file_id,md5sum"
    leaves = {c["content"]["field"]: c["content"]["value"] for c in body["filters"]["content"]}
    assert leaves == {"cases.project.project_id": ["TCGA-LUAD"], "files.data_type": ["Slide Image"],
                      "files.experimental_strategy": ["Tissue Slide"]}


def test_tissue_kind_returns_frozen_slides_only():
    with MockGDC(make_files()) as server:
        table = GDCClient(server.url).slide_files(["TCGA-BLCA"], "tissue")
    assert sorted(table["file_id"]) == ["00000000-0000-0000-0000-000000000007", "00000000-0000-0000-0000-000000000008"]


def test_empty_cohort_query_says_so():
    with MockGDC(make_files()) as server:
        with pytest.raises(DataError, match="no diagnostic slide files for project.s. TCGA-NOPE"):
            GDCClient(server.url).slide_files(["TCGA-NOPE"])
        with pytest.raises(DataError, match="no cases for project"):
            GDCClient(server.url).cases(["TCGA-NOPE"])


def test_cli_empty_query_exits_2_with_one_line(tmp_path, capsys):
    with MockGDC(make_files()) as server:
        code = cli.main(["gdc", "files", "--project", "TCGA-NOPE", "--out", str(tmp_path / "m.tsv"),
                         "--base-url", server.url])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "returned no" in err[0]
    assert not (tmp_path / "m.tsv").exists()


def test_cases_table_stage_and_survival():
    with MockGDC(cases=CASES) as server:
        table = GDCClient(server.url).cases(["TCGA-BLCA"]).set_index("patient_id")
    assert list(table.index) == ["TCGA-AA-1000", "TCGA-AA-1001", "TCGA-AA-1002"]
    assert table.loc["TCGA-AA-1000", ["stage", "os_days", "os_event"]].tolist() == ["III", 400, 1]
    assert table.loc["TCGA-AA-1001", ["stage", "os_days", "os_event"]].tolist() == ["II", 900, 0]
    assert table.loc["TCGA-AA-1002", "stage"] is None and pd.isna(table.loc["TCGA-AA-1002", "os_days"])


def test_manifest_is_gdc_client_format_and_reloads(tmp_path):
    files = make_files()
    with MockGDC(files) as server:
        code = cli.main(["gdc", "files", "--project", "TCGA-LUAD", "--out", str(tmp_path / "m.tsv"),
                         "--base-url", server.url])
    assert code == 0
    lines = (tmp_path / "m.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["id", "filename", "md5", "size", "state"]
    rows = [line.split("\t") for line in lines[1:]]
    expected = sorted([f.file_id, f.file_name, f.md5, str(len(f.data)), "released"] for f in files
                      if f.project_id == "TCGA-LUAD")
    assert sorted(rows) == expected
    reloaded = load_manifest(tmp_path / "m.tsv")
    assert set(reloaded["file_id"]) == {r[0] for r in expected}


def test_query_honours_retry_after_on_429():
    with MockGDC(make_files(), search_script=[("status", 429, 1)]) as server:
        table = GDCClient(server.url, backoff=0.01).slide_files(["TCGA-LUAD"])
    first, second = [r for r in server.log if r.path.startswith("/files")]
    assert first.status == 429 and second.status == 200
    assert second.time - first.time >= 0.95  # the client's own backoff is 0.01 s
    assert len(table) == 3


def test_non_gdc_answer_is_a_clear_error():
    with MockGDC(make_files(), search_script=[("garbage",)]) as server:
        with pytest.raises(DataError, match="not a GDC search result"):
            GDCClient(server.url).slide_files(["TCGA-BLCA"])


def test_unreachable_server_gives_up_with_clear_error():
    with MockGDC() as server:
        url = server.url
    time.sleep(0.2)  # the server has stopped
    with pytest.raises(DataError, match="no answer"):
        GDCClient(url, retries=1, backoff=0.01, timeout=2).slide_files(["TCGA-BLCA"])


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    from email.utils import formatdate

    assert 8 <= retry_after_seconds(formatdate(time.time() + 10, usegmt=True)) <= 10


def test_manifest_from_shipped_cohort_offline(tmp_path):
    from mambapath.cohorts import load_table

    code = cli.main(["gdc", "manifest", "tcga_kirp", "--out", str(tmp_path / "kirp.tsv")])
    assert code == 0
    manifest = pd.read_csv(tmp_path / "kirp.tsv", sep="\t")
    table = load_table("tcga_kirp")
    assert list(manifest.columns) == ["id", "filename", "md5", "size", "state"]
    assert manifest["id"].tolist() == table["file_id"].tolist()
    assert manifest["size"].sum() == table["size"].sum()


def test_write_manifest_roundtrip(tmp_path):
    frame = pd.DataFrame({"file_id": ["u1"], "file_name": ["a.svs"], "md5sum": ["f" * 32], "file_size": [12.0]})
    write_manifest(tmp_path / "m.tsv", frame)
    assert (tmp_path / "m.tsv").read_text() == f"id\tfilename\tmd5\tsize\tstate\nu1\ta.svs\t{'f' * 32}\t12\treleased\n"
