"""Value types: digests, names, tags, references, Accept negotiation, media types."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from proxy.errors import DigestInvalid, ManifestInvalid, NameInvalid
from proxy.model import (
    MAX_NAME_LENGTH,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    Digest,
    Outcome,
    Reference,
    accepts,
    is_digest,
    parse_name,
    parse_tag,
    references,
    sniff_media_type,
)

# The OCI distribution spec's grammar, written out independently of proxy.model.
SPEC_NAME = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*")
SPEC_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
HEX64 = "a" * 64
HEX128 = "0123456789abcdef" * 8

# --- Digest ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "algorithm", "hex_part"),
    [
        (f"sha256:{HEX64}", "sha256", HEX64),
        (f"sha512:{HEX128}", "sha512", HEX128),
    ],
)
def test_digest_parse(text: str, algorithm: str, hex_part: str) -> None:
    digest = Digest.parse(text)
    assert (digest.algorithm, digest.hex) == (algorithm, hex_part)
    assert str(digest) == text
    assert Digest.parse(str(digest)) == digest


@pytest.mark.parametrize(
    "text",
    [
        f"sha256:{'a' * 63}",
        f"sha256:{'a' * 65}",
        f"sha256:{HEX128}",
        f"sha512:{HEX64}",
        f"sha256:{'A' * 64}",
        f"sha256:{'a' * 63}A",
        f"sha256:{'g' * 64}",
        f"SHA256:{HEX64}",
        f"md5:{'a' * 32}",
        f"sha384:{'a' * 96}",
        f"sha256:{HEX64}\n",
        f" sha256:{HEX64}",
        f"sha256:{HEX64}/",
        "sha256:",
        ":abc",
        "sha256",
        "",
        "latest",
        "../../etc/passwd",
        f"sha256:../{'a' * 61}",
    ],
)
def test_digest_parse_rejects(text: str) -> None:
    with pytest.raises(DigestInvalid):
        Digest.parse(text)


def test_digest_of_and_hasher() -> None:
    data = b"hello"
    digest = Digest.of(data)
    assert digest == Digest("sha256", hashlib.sha256(data).hexdigest())
    assert Digest.of(data, "sha512").hex == hashlib.sha512(data).hexdigest()
    hasher = digest.hasher()
    hasher.update(data)
    assert hasher.hexdigest() == digest.hex


def test_is_digest() -> None:
    assert is_digest(f"sha256:{HEX64}")
    assert not is_digest("latest")


# --- repository names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "nginx",
        "library/nginx",
        "a/b/c/d",
        "my-app",
        "my--app",
        "my_app",
        "my__app",
        "my.app",
        "0",
        "ghcr.io/owner/app",
        "a" * MAX_NAME_LENGTH,
    ],
)
def test_parse_name_accepts(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Nginx",
        "library/Nginx",
        "/nginx",
        "nginx/",
        "a//b",
        "a/../b",
        "..",
        "../etc",
        "a..b",
        ".a",
        "-a",
        "_a",
        "a-",
        "a___b",
        "a._b",
        "a b",
        "a\\b",
        "a:b",
        "a%2fb",
        "a\x00b",
        "a" * (MAX_NAME_LENGTH + 1),
        "library/nginx\n",
        "nginx\n",
    ],
)
def test_parse_name_rejects(name: str) -> None:
    with pytest.raises(NameInvalid):
        parse_name(name)


NAME_ALPHABET = st.sampled_from([*"ab09._-/", "__", "..", "//", "\n", "A", "\\", ":"])


@hypothesis_settings(database=None, max_examples=500)
@given(st.lists(NAME_ALPHABET, max_size=12).map("".join))
@example("a\n")
@example("a/..")
def test_any_accepted_name_is_safe_under_a_root(candidate: str) -> None:
    try:
        name = parse_name(candidate)
    except NameInvalid:
        return
    assert SPEC_NAME.fullmatch(name)
    assert ".." not in name
    assert "//" not in name
    assert not name.startswith("/")
    assert "\n" not in name
    root = Path("/srv/cache/repos")
    assert (root / name).resolve().is_relative_to(root)


SPEC_COMPONENT = st.from_regex(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*", fullmatch=True)


@hypothesis_settings(database=None, max_examples=200)
@given(
    st.lists(SPEC_COMPONENT, min_size=1, max_size=4)
    .map("/".join)
    .filter(lambda n: len(n) <= MAX_NAME_LENGTH)
)
def test_every_spec_name_is_accepted(name: str) -> None:
    assert parse_name(name) == name


# --- tags and references ------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_x", "A-b_c.d", "a" * 128, "0"])
def test_parse_tag_accepts(tag: str) -> None:
    assert parse_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", ["", "-x", ".x", "a" * 129, "a/b", "a:b", "a b", "ta+g", "latest\n"]
)
def test_parse_tag_rejects(tag: str) -> None:
    with pytest.raises(ManifestInvalid):
        parse_tag(tag)


@hypothesis_settings(database=None, max_examples=300)
@given(st.text(alphabet=st.sampled_from(list("aZ9_.-:/ \n")), max_size=10))
@example("v1\n")
def test_any_accepted_tag_matches_the_spec(candidate: str) -> None:
    try:
        tag = parse_tag(candidate)
    except ManifestInvalid:
        return
    assert SPEC_TAG.fullmatch(tag)


def test_reference_parse_tag() -> None:
    ref = Reference.parse("v1.0")
    assert ref == Reference(tag="v1.0")
    assert ref.digest is None
    assert str(ref) == "v1.0"


def test_reference_parse_digest() -> None:
    ref = Reference.parse(f"sha256:{HEX64}")
    assert ref.tag is None
    assert ref.digest == Digest("sha256", HEX64)
    assert str(ref) == f"sha256:{HEX64}"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("sha256:abc", DigestInvalid),
        (f"sha256:{'A' * 64}", DigestInvalid),
        ("-bad", ManifestInvalid),
        ("", ManifestInvalid),
        ("a" * 129, ManifestInvalid),
    ],
)
def test_reference_parse_rejects(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        Reference.parse(text)


# --- Accept ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "media_type", "expected"),
    [
        (None, MEDIA_TYPE_OCI_MANIFEST, True),
        ("", MEDIA_TYPE_OCI_MANIFEST, True),
        ("*/*", MEDIA_TYPE_OCI_INDEX, True),
        ("application/*", MEDIA_TYPE_OCI_INDEX, True),
        ("text/*", MEDIA_TYPE_OCI_INDEX, False),
        (MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_MANIFEST, True),
        (MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX, False),
        (
            f"{MEDIA_TYPE_DOCKER_MANIFEST}, {MEDIA_TYPE_DOCKER_MANIFEST_LIST}",
            MEDIA_TYPE_DOCKER_MANIFEST_LIST,
            True,
        ),
        (
            f"{MEDIA_TYPE_DOCKER_MANIFEST},{MEDIA_TYPE_OCI_MANIFEST}",
            MEDIA_TYPE_OCI_INDEX,
            False,
        ),
        (MEDIA_TYPE_OCI_MANIFEST.upper(), MEDIA_TYPE_OCI_MANIFEST, True),
        (f"{MEDIA_TYPE_OCI_MANIFEST}; q=0.5", MEDIA_TYPE_OCI_MANIFEST, True),
        (f"{MEDIA_TYPE_OCI_MANIFEST};charset=utf-8", MEDIA_TYPE_OCI_MANIFEST, True),
        (f"{MEDIA_TYPE_OCI_MANIFEST};q=0", MEDIA_TYPE_OCI_MANIFEST, False),
        (f"{MEDIA_TYPE_OCI_MANIFEST}; q=0.0", MEDIA_TYPE_OCI_MANIFEST, False),
        (f"{MEDIA_TYPE_OCI_MANIFEST}; q = 0.000", MEDIA_TYPE_OCI_MANIFEST, False),
        ("*/*;q=0", MEDIA_TYPE_OCI_MANIFEST, False),
        (f"{MEDIA_TYPE_OCI_MANIFEST};q=0, */*", MEDIA_TYPE_OCI_INDEX, True),
        (f"{MEDIA_TYPE_OCI_MANIFEST};q=0.01", MEDIA_TYPE_OCI_MANIFEST, True),
    ],
)
def test_accepts(header: str | None, media_type: str, expected: bool) -> None:
    assert accepts(header, media_type) is expected


# --- media type sniffing ------------------------------------------------------------------


def _json(data: object) -> bytes:
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            _json({"mediaType": MEDIA_TYPE_DOCKER_MANIFEST, "layers": []}),
            MEDIA_TYPE_DOCKER_MANIFEST,
        ),
        (_json({"mediaType": MEDIA_TYPE_DOCKER_MANIFEST_LIST}), MEDIA_TYPE_DOCKER_MANIFEST_LIST),
        (_json({"schemaVersion": 2, "manifests": []}), MEDIA_TYPE_OCI_INDEX),
        (_json({"schemaVersion": 2, "config": {}, "layers": []}), MEDIA_TYPE_OCI_MANIFEST),
        (_json({"mediaType": "text/plain", "manifests": []}), MEDIA_TYPE_OCI_INDEX),
        (_json({"mediaType": "text/plain"}), None),
        (_json({"config": {}}), None),
        (_json({"schemaVersion": 1, "fsLayers": []}), None),
        (_json([1, 2]), None),
        (_json("manifest"), None),
        (b"not json", None),
        (b"\xff\xfe", None),
        (b"", None),
    ],
)
def test_sniff_media_type(body: bytes, expected: str | None) -> None:
    assert sniff_media_type(body) == expected


def test_sniff_media_type_survives_deeply_nested_json() -> None:
    # An upstream (or a corrupted cache file) can send any bytes up to the manifest cap;
    # json raises RecursionError, not ValueError, on deep nesting.
    assert sniff_media_type(b"[" * 100_000 + b"]" * 100_000) is None


# --- references ---------------------------------------------------------------------------


def _descriptor(label: str) -> dict[str, object]:
    return {"mediaType": "application/octet-stream", "digest": str(Digest.of(label.encode()))}


def test_references_of_an_image_manifest() -> None:
    body = _json(
        {
            "schemaVersion": 2,
            "config": _descriptor("config"),
            "layers": [_descriptor("l1"), _descriptor("l2")],
        }
    )
    assert references(body) == [Digest.of(b"config"), Digest.of(b"l1"), Digest.of(b"l2")]


def test_references_of_an_index() -> None:
    body = _json({"schemaVersion": 2, "manifests": [_descriptor("amd64"), _descriptor("arm64")]})
    assert references(body) == [Digest.of(b"amd64"), Digest.of(b"arm64")]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        _json([_descriptor("x")]),
        _json({"layers": "nope", "config": None}),
        _json({"layers": [{"digest": "sha256:short"}, {"digest": 5}, "string"]}),
    ],
)
def test_references_ignores_what_is_not_a_descriptor(body: bytes) -> None:
    assert references(body) == []


def test_references_survives_deeply_nested_json() -> None:
    assert references(b'{"layers": ' + b"[" * 100_000 + b"]" * 100_000 + b"}") == []


# --- Outcome ---------------------------------------------------------------------------------

# Written out rather than derived: X-Cache values and metric labels are an interface.
OUTCOMES = [
    # outcome, X-Cache, label, local, source
    (Outcome.HIT, "HIT", "hit", True, "cache"),
    (Outcome.MISS, "MISS", "miss", False, "upstream"),
    (Outcome.COALESCED, "COALESCED", "coalesced", False, "upstream"),
    (Outcome.REVALIDATED, "REVALIDATED", "revalidated", True, "cache"),
    (Outcome.STALE, "STALE", "stale", True, "cache"),
    (Outcome.DENIED, "DENIED", "denied", False, "upstream"),
    (Outcome.ERROR, "ERROR", "error", False, "upstream"),
    (Outcome.NONE, "NONE", "none", False, "upstream"),
]


def test_every_outcome_is_in_the_table() -> None:
    assert {row[0] for row in OUTCOMES} == set(Outcome)
    assert len(OUTCOMES) == len(Outcome)


@pytest.mark.parametrize(("outcome", "header", "label", "local", "source"), OUTCOMES)
def test_outcome_header_label_and_source(
    outcome: Outcome, header: str, label: str, local: bool, source: str
) -> None:
    assert outcome.header == header
    assert outcome.value == label
    assert Outcome(label) is outcome
    assert outcome.local is local
    assert outcome.source == source


def test_a_long_accept_line_is_decided_the_same_without_being_remembered() -> None:
    from proxy.model import MAX_CACHED_ACCEPT, _accepts

    line = ", ".join(["application/x-filler"] * (MAX_CACHED_ACCEPT // 20)) + ", */*;q=0"
    line += ", " + MEDIA_TYPE_OCI_MANIFEST
    assert len(line) > MAX_CACHED_ACCEPT
    before = _accepts.cache_info().currsize
    assert accepts(line, MEDIA_TYPE_OCI_MANIFEST)
    assert not accepts(line, MEDIA_TYPE_OCI_INDEX)
    assert _accepts.cache_info().currsize == before
