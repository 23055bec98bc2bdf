import zipfile

import pytest

from recalign import assets
from recalign.errors import InputError


def test_embedded_assets_cached_and_verified():
    directory = assets.fetch("ml-100k", verify=True)
    assert (directory / "ml-100k.inter").stat().st_size == 1979230


def _fake_asset(monkeypatch, tmp_path, sha):
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    with zipfile.ZipFile(wheel_dir / "pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("pkg/data.txt", "hello")
    asset = assets.Asset("fake", "pkg", "1.0", {"pkg/data.txt": sha}, "test")
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    monkeypatch.setenv("RECALIGN_HOME", str(tmp_path / "home"))

    def fake_download(a, into):
        target = into / "pkg-1.0-py3-none-any.whl"
        target.write_bytes((wheel_dir / target.name).read_bytes())
        return target

    monkeypatch.setattr(assets, "_download_wheel", fake_download)


def test_fetch_extracts_one_file_and_checks_sha(monkeypatch, tmp_path):
    import hashlib

    _fake_asset(monkeypatch, tmp_path, hashlib.sha256(b"hello").hexdigest())
    directory = assets.fetch("fake")
    assert (directory / "data.txt").read_text() == "hello"
    assert sorted(p.name for p in directory.iterdir()) == ["data.txt"]


def test_fetch_rejects_bad_checksum(monkeypatch, tmp_path):
    _fake_asset(monkeypatch, tmp_path, "0" * 64)
    with pytest.raises(InputError, match="sha256 mismatch"):
        assets.fetch("fake")
    assert not any((tmp_path / "home").rglob("data.txt*"))


def test_offline_and_not_cached_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("RECALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(InputError, match="could not download recbole==1.2.1"):
        assets.fetch("ml-100k")


def test_unknown_asset():
    with pytest.raises(InputError, match="unknown asset 'nope'"):
        assets.fetch("nope")


def test_a_recalign_home_that_cannot_hold_caches_is_one_line(tmp_path, monkeypatch):
    from recalign import assets
    from recalign.errors import InputError

    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file", "/proc/recalign"):
        monkeypatch.setenv("RECALIGN_HOME", str(bad))
        with pytest.raises(InputError, match=r"^RECALIGN_HOME=.*: not a directory recalign can keep its caches in"):
            assets.home()
    monkeypatch.setenv("RECALIGN_HOME", str(tmp_path / "new"))
    assert assets.home() == tmp_path / "new"
