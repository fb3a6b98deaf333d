"""The rbd image spec (QEMU's ``rbd:POOL/IMAGE[@SNAP][:KEY=VALUE...]``), parsed purely."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkdev.disks import rbd
from blkdev.disks.rbd import DEFAULT_TIMEOUT, RbdSpec, format_spec, parse_spec

names = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=12)
keys = names.filter(lambda k: k not in ("conf", "id"))


@st.composite
def specs(draw: st.DrawFn) -> RbdSpec:
    options = draw(st.dictionaries(keys, st.text(max_size=8).filter(lambda v: "\0" not in v)))
    return RbdSpec(
        pool=draw(names),
        image=draw(names),
        snap=draw(st.none() | names),
        conf=draw(st.none() | names),
        user=draw(st.none() | names),
        options=tuple(options.items()),
    )


@given(specs())
def test_format_then_parse_round_trips(spec: RbdSpec) -> None:
    assert parse_spec(format_spec(spec)) == spec


@given(st.text(max_size=40))
def test_any_text_parses_or_says_why(text: str) -> None:
    try:
        spec = parse_spec(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert spec.pool and spec.image and spec.snap != ""


def test_qemu_examples() -> None:
    assert parse_spec("rbd/vm1") == RbdSpec("rbd", "vm1")
    assert parse_spec("rbd/vm1@base:conf=/etc/ceph/a.conf:id=cinder") == RbdSpec(
        "rbd", "vm1", "base", "/etc/ceph/a.conf", "cinder"
    )
    spec = parse_spec("p/i:rados_osd_op_timeout=5:conf=/x@y/z.conf")
    assert spec.conf == "/x@y/z.conf"  # '@' and '/' in an option value need no escape
    assert spec.options == (("rados_osd_op_timeout", "5"),)
    assert parse_spec(r"p/a\:b\@c") == RbdSpec("p", "a:b@c")


def test_defaults_fill_only_what_the_spec_leaves_out() -> None:
    options = dict(parse_spec("p/i:rados_osd_op_timeout=5:rbd_cache=true").rados_options())
    assert options["rados_osd_op_timeout"] == "5"
    assert options["rados_mon_op_timeout"] == str(DEFAULT_TIMEOUT)
    assert options["client_mount_timeout"] == str(DEFAULT_TIMEOUT)
    assert options["rbd_cache"] == "true"
    assert dict(parse_spec("p/i").rados_options())["rbd_cache"] == "false"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not POOL/IMAGE"),
        ("pool", "not POOL/IMAGE"),
        ("pool@snap", "not POOL/IMAGE"),
        ("/image", "empty pool"),
        ("pool/", "empty image"),
        ("pool/image@", "empty snapshot"),
        ("pool/image@a@b", "two snapshots"),
        ("pool/ns/image", "namespaces"),
        ("pool/image:conf", "not KEY=VALUE"),
        ("pool/image:=x", "not KEY=VALUE"),
        ("pool/image:a=1:a=2", "sets a twice"),
        ("pool/image:id=a:id=b", "sets id twice"),
        ("pool/image\\", "lone"),
    ],
)
def test_bad_specs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_spec(text)


def test_a_snapshot_is_what_the_text_says() -> None:
    assert str(parse_spec("p/i@s:id=u")) == "p/i@s:id=u"
    assert rbd.SCHEME == "rbd"
