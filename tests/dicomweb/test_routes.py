"""harmony.dicomweb.routes: every PS3.18 resource path to a parsed request; 404, 405 and 400 otherwise."""

from __future__ import annotations

import pytest

from harmony.dicomweb.routes import parse_bulk_path, parse_frame_list, parse_path, resource_path
from harmony.errors import BadRequest, MethodNotAllowed, NotFound

S, R, INST = "1.2.3", "1.2.3.4", "1.2.3.4.5"


@pytest.mark.parametrize("method, path, service, resource, level", [
    ("GET", "/studies", "qido", "studies", "STUDY"),
    ("GET", "/series", "qido", "series", "SERIES"),
    ("GET", f"/studies/{S}/instances", "qido", "instances", "IMAGE"),
    ("GET", f"/studies/{S}/series/{R}/instances", "qido", "instances", "IMAGE"),
    ("POST", "/studies", "stow", "studies", "STUDY"),
    ("POST", f"/studies/{S}", "stow", "studies", "STUDY"),
    ("GET", f"/studies/{S}", "wado", "study", "STUDY"),
    ("HEAD", f"/studies/{S}/metadata", "wado", "metadata", "STUDY"),
    ("GET", f"/studies/{S}/series/{R}/rendered", "wado", "rendered", "SERIES"),
    ("GET", f"/studies/{S}/series/{R}/instances/{INST}", "wado", "instance", "IMAGE"),
    ("GET", f"/studies/{S}/series/{R}/instances/{INST}/frames/1,3/thumbnail", "wado", "thumbnail", "IMAGE"),
    ("GET", f"/studies/{S}/series/{R}/instances/{INST}/bulkdata/00540016/0/00181072", "wado", "bulkdata", "IMAGE"),
])
def test_resources(method, path, service, resource, level):
    req = parse_path(method, path)
    assert (req.service, req.resource, req.level) == (service, resource, level)
    assert req.path == path


def test_uids_frames_and_the_per_ae_prefix():
    req = parse_path("GET", f"/aets/PACS_A/rs/studies/{S}/series/{R}/instances/{INST}/frames/2,5")
    assert (req.aet, req.study_uid, req.series_uid, req.instance_uid, req.frames) == ("PACS_A", S, R, INST, (2, 5))
    assert req.path == f"/studies/{S}/series/{R}/instances/{INST}/frames/2,5"
    assert resource_path(S, R, INST) == f"/studies/{S}/series/{R}/instances/{INST}"
    assert resource_path(S) == f"/studies/{S}"


@pytest.mark.parametrize("method, path, error", [
    ("GET", "/", NotFound), ("GET", "/patients", NotFound), ("GET", "/aets/X/studies", NotFound),
    ("DELETE", "/studies", MethodNotAllowed), ("POST", f"/studies/{S}/series", MethodNotAllowed),
    ("GET", "/studies/../etc", BadRequest), ("GET", f"/studies/{S}/series/x%2Fy", BadRequest),
    ("GET", f"/studies/{S}/series/{R}/instances/{INST}/frames/0", BadRequest),
    ("GET", f"/studies/{S}/series/{R}/instances/{INST}/nothing", NotFound),
    ("GET", "/aets/BAD AET/rs/studies", BadRequest),
])
def test_what_is_not_a_resource(method, path, error):
    with pytest.raises(error):
        parse_path(method, path)


def test_frame_lists_and_bulk_paths():
    assert parse_frame_list("1,2,10") == (1, 2, 10)
    for bad in ("", "1,,2", "a", "-1", "1" * 10):
        with pytest.raises(BadRequest):
            parse_frame_list(bad)
    assert parse_bulk_path(["7fe00010"]) == ("7FE00010",)
    for bad in (["7FE00010", "0"], ["..", "0", "7FE00010"], ["00540016", "01", "00181072"]):
        with pytest.raises(BadRequest):
            parse_bulk_path(bad)
